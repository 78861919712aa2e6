"""Values from SIP as policer shows them (:func:`policer.printable.printable`): one
unambiguous form in metric labels, JSON and terminals, for bytes that are not UTF-8
and for terminal control characters."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from lab.redis_server import free_port
from policer.call import Call, raw_bytes, text
from policer.printable import from_printable, printable, printable_data
from tests.support import STORE_TIMEOUT_MS, wait_for
from tests.support.cli import ROOT, policy_copy, run_cli

#: what a value from SIP may hold once policer.call.text kept it
sip_values = st.one_of(
    st.binary(max_size=30).map(text),
    st.text(max_size=30).map(text),
    st.text(alphabet=st.sampled_from(list("\\x0fu\x1b\x7f\x85\x9b\udcff\ud800é")),
            max_size=12).map(text),
)

#: what must never reach a terminal or a strict JSON / Prometheus reader
FORBIDDEN = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))}


def _clean(shown: str) -> bool:
    shown.encode("utf-8")  # no surrogate left
    return not set(shown) & FORBIDDEN


@settings(max_examples=500, deadline=None)
@given(v=sip_values)
def test_printable_round_trips_and_shows_no_control_character(v: str) -> None:
    shown = printable(v)
    assert _clean(shown)
    assert from_printable(shown) == v


@settings(max_examples=300, deadline=None)
@given(a=sip_values, b=sip_values)
def test_two_different_values_never_print_the_same(a: str, b: str) -> None:
    if raw_bytes(a) != raw_bytes(b):
        assert printable(a) != printable(b)


@pytest.mark.parametrize(("value", "shown"), [
    ("alice", "alice"),
    ("ü\U0001F600", "ü\U0001F600"),
    (text(b"m\xffx"), "m\\xffx"),
    ("m\\xffx", "m\\\\xffx"),  # the text of an escape is not the byte
    ("\x1b[2J", "\\x1b[2J"),
    ("a\r\nb\x00\x7f", "a\\x0d\\x0ab\\x00\\x7f"),
    ("\x9b2J", "\\u009b2J"),  # a C1 control is not the byte 0x9b
    (text(b"\x9b2J"), "\\x9b2J"),
    ("\ud800", "\\xed\\xa0\\x80"),  # a lone surrogate: the bytes the store keys it by
])
def test_the_escape_form(value: str, shown: str) -> None:
    assert printable(value) == shown


def test_printable_data_escapes_keys_values_and_odd_types() -> None:
    v = text(b"\xff\x1b")
    data = {v: [v, (v, 1)], "n": None, "b": True, "f": 1.5, "o": RuntimeError(v)}
    assert printable_data(data) == {
        "\\xff\\x1b": ["\\xff\\x1b", ["\\xff\\x1b", 1]], "n": None, "b": True, "f": 1.5,
        "o": "\\xff\\x1b"}


def test_from_printable_refuses_a_lone_backslash() -> None:
    with pytest.raises(ValueError, match="backslash"):
        from_printable("a\\b")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_reads_the_shown_form_back_to_the_bytes() -> None:
    values = [text(b"m\xffx"), "\x1b[2J", "back\\slash", "\x85", "ü", text(b"\xc3(")]
    for v in values:
        out = subprocess.run(["bash", "-c", f"printf %s $'{printable(v)}'"],
                             capture_output=True, check=True,
                             env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}).stdout
        assert out == raw_bytes(v), v


# --------------------------------------------------------------------------- where shown

#: a From user with a byte that is not UTF-8 (the CLI keeps argv bytes as surrogates)
ODD = text(b"m\xffx")
#: a From user that clears the terminal it is printed on
ESC = "\x1b[2J"
#: an account with a backslash, and one with a C1 control (CSI)
SLASHED = "a\\xffb"
C1 = "\x9b31m"


@pytest.fixture
def hostile(env: dict[str, str]) -> dict[str, str]:
    """Two live dialogs whose values are not printable as they are."""
    run_cli("admit", "--from", ODD, "--to", "5551234", "--call-id", "c1", "--from-tag",
            "t1", "--header", f"X-Account: {SLASHED}", env=env, check=True)
    run_cli("admit", "--from", ESC, "--to", "0\x1b]0;pwned\x07", "--call-id", "c2\x1b[31m",
            "--from-tag", "t2", "--header", f"X-Account: {C1}", env=env, check=True)
    return env


def _no_control(out: str) -> None:
    assert not set(out) & (FORBIDDEN - {"\n", "\t"}), out
    assert "\\udc" not in out  # no Python backslashreplace of a surrogate either


def test_exporter_metrics_answer_with_escaped_labels(hostile: dict[str, str]) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policer", "exporter", "--listen",
                             f"127.0.0.1:{port}"], env={**os.environ, **hostile}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        got: list[tuple[int, bytes]] = []

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    got.append((r.status, r.read()))
            except urllib.error.HTTPError as e:
                got.append((e.code, e.read()))
            except OSError:
                return proc.poll() is not None
            return True

        assert wait_for(scraped, 20) and got, proc.stderr
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    status, body = got[-1]
    assert status == 200, err.decode(errors="replace")[-2000:]
    assert b"\x1b" not in body
    labels = {(s.name, s.labels.get("profile"), s.labels.get("value")): s.value
              for f in text_string_to_metric_families(body.decode())
              for s in f.samples}
    for profile, v in (("user", ODD), ("user", ESC), ("account", SLASHED), ("account", C1)):
        assert labels[("policer_profile_dialogs", profile, printable(v))] == 1, v
    assert labels[("policer_profile_dialogs", "user", "m\\xffx")] == 1


def test_cluster_collector_escapes_labels_in_any_registry(redis_url: str, namespace: str,
                                                          tmp_path: Path) -> None:
    """The collector ``policer serve``'s /metrics renders too."""
    from prometheus_client import CollectorRegistry, generate_latest

    from policer.engine import Engine
    from policer.metrics import ClusterCollector
    from policer.policy import load_policy
    from policer.store import RedisStore

    policy = load_policy(policy_copy(tmp_path, namespace))
    store = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    try:
        engine = Engine(policy, store, node="n")
        for i, user in enumerate((b"m\xffx", b"\x1b[2J", b"\xc2\x9b")):
            assert engine.admit(Call.from_raw(f"k{i}", "t", from_user=user,
                                              ruri_user="5551234")).admitted
        registry = CollectorRegistry()
        registry.register(ClusterCollector(policy, store))
        body = generate_latest(registry).decode()
    finally:
        store.close()
    values = {s.labels["value"] for f in text_string_to_metric_families(body)
              for s in f.samples if s.name == "policer_profile_dialogs"
              and s.labels["profile"] == "user"}
    assert values == {"", "m\\xffx", "\\x1b[2J", "\\u009b"}


def test_cli_tables_print_no_control_byte(hostile: dict[str, str]) -> None:
    env = hostile
    run_cli("limits", "set", "account", C1, "5", env=env, check=True)
    out = {}
    for name, args in (
            ("values", ("profile", "list", "user")),
            ("accounts", ("profile", "list", "account")),
            ("dialogs", ("profile", "list", "user", ESC)),
            ("show", ("dialog", "show", "c2%1B%5B31m;t2")),
            ("top", ("top", "--once", "--interval", "0.1")),
            ("limits", ("limits", "get", "account")),
            ("set", ("limits", "set", "account", ESC, "7")),
            ("explain", ("explain", "--from", ESC, "--to", "0\x1b]0;x\x07")),
            ("none", ("dialog", "show", "no\x1b[2Jsuch"))):
        proc = run_cli(*args, env=env)
        assert proc.returncode in (0, 1), (args, proc.stderr)
        _no_control(proc.stdout + proc.stderr)
        out[name] = proc.stdout
    shown = {ln.split("\t")[0] for ln in (out["values"] + out["accounts"]).splitlines()}
    assert shown == {"m\\xffx", "\\x1b[2J", "a\\\\xffb", "\\u009b31m"}
    for dialog in (out["dialogs"], out["show"]):
        assert "  from       \\x1b[2J" in dialog
        assert "  call_id    c2\\x1b[31m" in dialog
        assert "  to         0\\x1b]0;pwned\\x07" in dialog
    assert "user=m\\xffx" in out["top"] and "user=\\x1b[2J" in out["top"]
    assert "\\u009b31m\t5" in out["limits"]
    assert "account \\x1b[2J: - -> 7" in out["set"]
    assert "0\\x1b]0;x\\x07" in out["explain"]
    for cid in ("c1", "c2\x1b[31m"):
        run_cli("release", "--call-id", cid, "--from-tag", "t" + cid[1], env=env, check=True)
    cdr = run_cli("cdr", "tail", env=env, check=True).stdout
    _no_control(cdr)
    assert len(cdr.splitlines()) == 2
    assert "\\x1b[2J -> 0\\x1b]0;pwned\\x07 call-id=c2\\x1b[31m node=" in cdr


def _strict_json(line: str) -> Any:
    """JSON as a strict reader takes it (orjson refuses lone surrogates)."""
    return orjson.loads(line)


def test_cli_json_is_strict_json_in_the_printable_form(hostile: dict[str, str]) -> None:
    env = hostile
    values = _strict_json(run_cli("profile", "list", "user", "--json", env=env).stdout)
    assert values["values"] == {"m\\xffx": 1, "\\x1b[2J": 1}
    assert {from_printable(v) for v in values["values"]} == {ODD, ESC}
    accounts = _strict_json(run_cli("profile", "list", "account", "--json", env=env).stdout)
    assert {from_printable(v) for v in accounts["values"]} == {SLASHED, C1}
    (d,) = _strict_json(run_cli("profile", "list", "user", ODD, "--json", env=env).stdout)
    assert d["call_id"] == "c1"
    shown = _strict_json(run_cli("dialog", "show", "c2%1B%5B31m;t2", "--json",
                                 env=env).stdout)
    assert (shown["call_id"], shown["from"], shown["to"]) == (
        "c2\\x1b[31m", "\\x1b[2J", "0\\x1b]0;pwned\\x07")
    assert from_printable(shown["call_id"]) == "c2\x1b[31m"
    admitted = _strict_json(run_cli("admit", "--from", ODD, "--to", "5551234", "--json",
                                    env=env).stdout)
    assert "user=m\\xffx" in admitted["memberships"]
    x = _strict_json(run_cli("explain", "--from", ODD, "--header", f"X-Account: {C1}",
                             "--to", "5551234", "--json", env=env).stdout)
    assert {(v["profile"], v["value"]) for v in x["limits"]} >= {
        ("user", "m\\xffx"), ("account", "\\u009b31m")}
    run_cli("limits", "set", "account", ODD, "2", env=env, check=True)
    live = _strict_json(run_cli("limits", "get", "account", "--json", env=env).stdout)
    assert live["limits"] == {"m\\xffx": 2}
    run_cli("release", "--call-id", "c2\x1b[31m", "--from-tag", "t2", env=env, check=True)
    (rec,) = [_strict_json(ln) for ln in run_cli("cdr", "tail", "--json",
                                                 env=env).stdout.splitlines()]
    assert rec["CallID"] == "c2\\x1b[31m" and rec["To"] == "0\\x1b]0;pwned\\x07"


def test_serve_answers_and_metrics_are_strict_in_the_printable_form(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    """The decision service's routes (policer.serve.Service, as its HTTP server calls
    them): a From user with byte 0xff (JSON ``\\udcff``, as a proxy sends it) and one
    with an ESC sequence."""
    from policer.engine import Engine
    from policer.policy import load_policy
    from policer.serve import Service
    from policer.serve.supervisor import metrics_renderer
    from policer.store import RedisStore

    policy = load_policy(policy_copy(tmp_path, namespace))
    store = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    try:
        engine = Engine(policy, store, node="serve-test")
        service = Service(engine, metrics=metrics_renderer(engine))
        answers = []
        for cid, user in (("s1", "m\\udcffx"), ("s2\\u001b[31m", "\\u001b[2J"),
                          ("s3", "back\\\\slash")):
            body = (f'{{"call_id": "{cid}", "from_tag": "t", "from_user": "{user}", '
                    f'"ruri_user": "5551234", "headers": {{"X-Account": "{user}"}}}}')
            for path in ("/v1/explain", "/v1/admit"):
                r = service.handle("POST", path, body.encode())
                assert r.status == 200, r.body
                answers.append(_strict_json(r.body.decode()))
        admitted = [a for a in answers if "memberships" in a]
        assert [m for a in admitted for m in a["memberships"] if m.startswith("user=")] == [
            "user=m\\xffx", "user=\\x1b[2J", "user=back\\\\slash"]
        explained = [a for a in answers if "limits" in a]
        assert {v["value"] for a in explained for v in a["limits"]
                if v["profile"] == "account"} == {"m\\xffx", "\\x1b[2J", "back\\\\slash"}
        r = service.handle("POST", "/v1/release",
                           b'{"call_id": "s2\\u001b[31m", "from_tag": "t"}')
        record = _strict_json(r.body.decode())["record"]
        assert (record["CallID"], record["From"]) == ("s2\\x1b[31m", "\\x1b[2J")
        r = service.handle("GET", "/metrics", b"")
        assert r.status == 200 and b"\x1b" not in r.body
        values = {s.labels["value"] for f in text_string_to_metric_families(r.body.decode())
                  for s in f.samples if s.name == "policer_profile_dialogs"
                  and s.labels["profile"] == "user"}
        assert values == {"", "m\\xffx", "back\\\\slash"}
    finally:
        store.close()


def test_logs_show_values_in_the_printable_form(env: dict[str, str]) -> None:
    call = ("admit", "--from", ODD, "--call-id", "l\x1b[2J", "--to", "5551234")
    console = run_cli(*call, env={**env, "POLICER_LOG_FORMAT": "console",
                                  "POLICER_LOG_LEVEL": "debug"}, check=True).stderr
    _no_control(console)
    assert "call_id=l\\x1b[2J" in console
    lines = run_cli(*call, "--from-tag", "again", env={**env, "POLICER_LOG_LEVEL": "debug"},
                    check=True).stderr.splitlines()
    (decision,) = [e for e in map(_strict_json, lines) if e["event"] == "decision"]
    assert decision["call_id"] == "l\\x1b[2J"
    assert "user=m\\xffx" in decision["memberships"]


def test_the_exporter_logs_a_near_limit_value_escaped_once(redis_url: str, namespace: str,
                                                           tmp_path: Path) -> None:
    import io

    from prometheus_client import CollectorRegistry, generate_latest

    from policer import log
    from policer.engine import Engine
    from policer.metrics import ClusterCollector
    from policer.policy import load_policy
    from policer.store import RedisStore

    policy = load_policy(policy_copy(tmp_path, namespace))  # user: {max: 3}
    store = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    out = io.StringIO()
    log.configure(level="info", fmt="json", stream=out)
    try:
        engine = Engine(policy, store, node="n")
        for i in range(3):
            assert engine.admit(Call.from_raw(f"near{i}", "t", from_user=b"m\xffx",
                                              ruri_user="5551234")).admitted
        registry = CollectorRegistry()
        registry.register(ClusterCollector(policy, store))
        generate_latest(registry)
    finally:
        log.configure(level=os.environ.get("POLICER_LOG_LEVEL", "warning"))
        store.close()
    near = [e for e in map(_strict_json, out.getvalue().splitlines())
            if e["event"] == "near_limit" and e["profile"] == "user"]
    assert [e["value"] for e in near] == ["m\\xffx"]
