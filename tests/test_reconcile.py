"""``policer reconcile``: after Redis lost state (restarted empty) or a proxy
lost its lease while only cut off, the counts are rebuilt from what each
proxy really carries, and ghosts no proxy knows are removed. The proxy side
here is the JSON that Kamailio 5.6's ``dlg.list`` returns (captured from a
real Kamailio); the end-to-end suite runs it against real proxies."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policer.call import Call
from policer.engine import Engine
from policer.policy import load_policy
from policer.reconcile import CALL_VAR, parse_dialogs, reconcile
from policer.store import RedisStore
from policer.store.keys import dialog_id
from tests.support import call
from tests.support.cli import cli_json, policy_copy, run_cli


def kamailio_dialog(c: Call, state: int = 4, keep_call: bool = True) -> dict[str, Any]:
    """One entry of Kamailio's dlg.list result, as Kamailio 5.6 writes it."""
    return {
        "h_entry": 1133, "h_id": 3856, "ref": 2, "call-id": c.call_id,
        "from_uri": f"sip:{c.from_user}@127.0.0.1:5992", "to_uri": f"sip:{c.ruri_user}@proxy",
        "state": state, "start_ts": 1795667458, "init_ts": 1795667458, "end_ts": 0,
        "duration": 2, "timeout": 1795710657, "lifetime": 43200, "dflags": 515,
        "sflags": 0, "iflags": 0,
        "caller": {"tag": c.from_tag, "contact": "sip:a@127.0.0.1", "cseq": "1",
                   "route_set": "", "socket": "udp:127.0.0.1:5990"},
        "callee": {"tag": "callee-tag", "contact": "sip:b@127.0.0.1", "cseq": "0",
                   "route_set": "", "socket": "udp:127.0.0.1:5990"},
        "profiles": [],
        "variables": [{CALL_VAR: c.to_json()}] if keep_call else [],
    }


@pytest.fixture
def setup(tmp_path: Path, redis_url: str, namespace: str) -> tuple[Engine, RedisStore, Path]:
    path = policy_copy(tmp_path, namespace)
    store = RedisStore(redis_url, namespace, timeout_ms=5000)
    return Engine(load_policy(path), store, node="proxy-a"), store, path


def test_lost_calls_are_counted_again_and_ghosts_removed(
        setup: tuple[Engine, RedisStore, Path]) -> None:
    engine, store, _ = setup
    acme = {"X-Account": "acme"}
    up = [call("0301234567", "alice", headers=acme), call("5551234", "bob", headers=acme)]
    ghost = engine.admit(call("5551234", "carol"))  # the proxy no longer has this one
    kept = engine.admit(up[0])
    assert kept.admitted and ghost.admitted
    # Redis lost up[1] (failover to a replica that had not received it yet)
    proxy_side = [kamailio_dialog(up[0]), kamailio_dialog(up[1], state=2),
                  kamailio_dialog(call("5551234", "dave"), state=5)]  # 5 = deleted
    report = reconcile(engine.policy, store, "proxy-a", parse_dialogs(proxy_side))
    assert report.kept == 1 and report.added == [dialog_id(up[1].call_id, up[1].from_tag)]
    assert report.removed == [ghost.dialog_id] and report.partial == []
    assert store.profile_size("total") == 2
    assert store.profile_size("account", "acme") == 2  # header-valued profile rebuilt
    assert store.profile_size("user", "carol") == 0
    assert store.dialog(dialog_id(up[1].call_id, up[1].from_tag)).state == "early"  # type: ignore[union-attr]
    assert store.ended()["reconciled"] == 1
    # running it again changes nothing
    again = reconcile(engine.policy, store, "proxy-a", parse_dialogs(proxy_side))
    assert (again.kept, again.added, again.removed) == (2, [], [])


def test_without_the_adapters_variable_the_uris_still_give_user_and_class(
        setup: tuple[Engine, RedisStore, Path]) -> None:
    engine, store, _ = setup
    c = call("00441632960123", "erin", headers={"X-Account": "acme"})
    report = reconcile(engine.policy, store, "proxy-a",
                       parse_dialogs([kamailio_dialog(c, keep_call=False)]))
    assert report.partial == [dialog_id(c.call_id, c.from_tag)]
    assert store.profile_size("international") == 1 and store.profile_size("user", "erin") == 1
    assert store.profile_size("account", "acme") == 0  # the header is not in dlg.list
    assert store.dialog(dialog_id(c.call_id, c.from_tag)).state == "confirmed"  # type: ignore[union-attr]


def test_malformed_entries_are_skipped() -> None:
    good = kamailio_dialog(call("5551234", "fay"))
    assert len(parse_dialogs([{"state": 4}, "junk", None, {**good, "caller": "x"}, good])) == 1
    assert parse_dialogs({"not": "a list"}) == []
    bad_var = {**good, "variables": [{CALL_VAR: "{not json"}]}
    assert parse_dialogs([bad_var])[0].call.from_user == ""


@pytest.fixture
def fake_proxy_socket(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A JSON-RPC datagram endpoint answering dlg.list like Kamailio's jsonrpcs."""
    path = str(tmp_path / "kamailio_rpc.sock")
    dialogs: list[dict[str, Any]] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65536)
            except OSError:
                continue
            req = json.loads(data)
            reply = {"jsonrpc": "2.0", "result": dialogs, "id": req["id"]}
            sock.sendto(json.dumps(reply).encode(), peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"unix:{path}", dialogs
    stop.set()
    t.join(timeout=2)
    sock.close()
    os.unlink(path)


def test_cli_reconcile_reports_and_applies(setup: tuple[Engine, RedisStore, Path],
                                           fake_proxy_socket: tuple[str, list[Any]],
                                           redis_url: str) -> None:
    _engine, store, path = setup
    address, dialogs = fake_proxy_socket
    c = call("5551234", "gus")
    dialogs.append(kamailio_dialog(c))
    env = {"POLICER_REDIS_URL": redis_url, "POLICER_POLICY": str(path)}
    dry = cli_json("reconcile", "--proxy", f"proxy-a={address}", "--dry-run", env=env)
    assert dry[0]["added"] == [dialog_id(c.call_id, c.from_tag)]
    assert store.profile_size("total") == 0
    proc = run_cli("reconcile", "--proxy", f"proxy-a={address}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "add 1, remove 0" in proc.stdout and store.profile_size("total") == 1
    missing = run_cli("reconcile", "--proxy", "proxy-b=unix:/nonexistent/rpc.sock", env=env)
    assert missing.returncode == 3 and "cannot list dialogs" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_calls_that_moved_on_while_the_list_was_taken_are_left_alone(
        setup: tuple[Engine, RedisStore, Path]) -> None:
    engine, store, _ = setup
    listed = [call("5551234", "hal"), call("5551234", "ida")]
    for c in listed:
        assert engine.admit(c).admitted
    ghost = engine.admit(call("5551234", "kim"))  # the proxy no longer has this one
    snapshot = [kamailio_dialog(c) for c in listed]
    store.clock_offset_ms += 5  # (the store's clock moves on: the proxy lists later)
    listed_at = store.now_ms()
    store.clock_offset_ms += 5  # (and on again while the list is read)
    newer = engine.admit(call("5551234", "jan"))  # admitted after the proxy listed
    # ended after the proxy listed it
    engine.release(dialog_id(listed[1].call_id, listed[1].from_tag), "bye")
    assert store.dialog(newer.dialog_id).init_ms > listed_at  # type: ignore[union-attr]
    # without the time of the listing, the newer call would look like a ghost
    blind = reconcile(engine.policy, store, "proxy-a", parse_dialogs(snapshot), dry_run=True)
    assert sorted(blind.removed) == sorted([ghost.dialog_id, newer.dialog_id])
    report = reconcile(engine.policy, store, "proxy-a", parse_dialogs(snapshot),
                       listed_at_ms=listed_at)
    assert report.removed == [ghost.dialog_id] and report.added == []
    assert store.dialog(newer.dialog_id).state == "early"  # type: ignore[union-attr]
    assert store.dialog(dialog_id(listed[1].call_id, listed[1].from_tag)).state == "ended"  # type: ignore[union-attr]
    assert store.profile_size("total") == 2  # hal and jan
