"""What an operator sees: Prometheus metrics (cluster-wide and per worker),
the Grafana dashboard's queries, call-end records, shadow limits, ``policer
top`` and the structured logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.redis_server import free_port
from tests.support.cli import ROOT, cli_json, log_events, policy_copy, run_cli

# A scripted day: what the worker process below does, and what must be seen after it.
SCRIPT = textwrap.dedent("""
    import os, sys
    from policer.call import Call
    from policer.engine import Engine
    from lab.redis_server import free_port

    e = Engine.from_env()
    def call(cid, user, number, account=None):
        h = {"X-Account": account} if account else {}
        return e.admit(Call.from_raw(cid, "ft", from_user=user, ruri_user=number, headers=h))

    for i in range(3):
        assert call(f"a{i}", "alice", "5551234").admitted        # local
    assert not call("a3", "alice", "5551234").admitted            # user limit (3)
    d = call("i1", "bob", "00441632960123", "acme")                # international
    assert d.admitted
    s = call("sos", "alice", "112")                                 # emergency, bypass
    assert s.admitted and s.bypass
    e.confirm(d.dialog_id)
    e.release("a0;ft", "bye")
    e.release("a1;ft", "cancel")
    # one decision while the store is unreachable: fallback, counted as a store error
    down = Engine.from_env(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert down.admit(Call.from_raw("f1", "ft", from_user="zed", ruri_user="123")).fallback
""")


@pytest.fixture
def day(tmp_path: Path, redis_url: str, namespace: str) -> dict[str, str]:
    """Runs the scripted day in a worker process with multiprocess metrics on."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = dict(os.environ, POLICER_REDIS_URL=redis_url,
               POLICER_POLICY=str(policy_copy(tmp_path, namespace)),
               PROMETHEUS_MULTIPROC_DIR=str(mp_dir), POLICER_NODE="proxy-a",
               POLICER_LOG_LEVEL="warning")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    run_cli("dialog", "end", "a2;ft", env=env, check=True)
    return env


@pytest.fixture
def exporter(day: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = dict(day, POLICER_LOG_LEVEL="info", POLICER_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "policer", "exporter", "--listen",
                             f"127.0.0.1:{port}", "--values", "account=globex"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(f"exporter did not start: {proc.communicate()}") from None
            time.sleep(0.1)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=10)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_exporter_serves_cluster_state_and_worker_metrics(
        exporter: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = exporter
    m = scrape(url)
    # live now: alice's emergency call and bob's international call
    assert value(m, "policer_store_up") == 1
    assert value(m, "policer_profile_dialogs", profile="total", value="") == 2
    assert value(m, "policer_profile_dialogs", profile="international", value="") == 1
    assert value(m, "policer_profile_dialogs", profile="user", value="alice") == 1
    assert value(m, "policer_profile_dialogs", profile="account", value="acme") == 1
    # a listed value with no calls still has its series (bounded, operator-chosen)
    assert value(m, "policer_profile_dialogs", profile="account", value="globex") == 0
    assert value(m, "policer_profile_limit", profile="total", value="") == 100
    assert value(m, "policer_profile_limit", profile="user", value="alice") == 3
    assert value(m, "policer_profile_utilization", profile="international", value="") == 0.05
    assert value(m, "policer_dialogs", state="early") == 1
    assert value(m, "policer_dialogs", state="confirmed") == 1
    assert value(m, "policer_decisions_total", result="admitted", profile="total") == 5
    assert value(m, "policer_decisions_total", result="bypassed", profile="user") == 1
    assert value(m, "policer_decisions_total", result="rejected", profile="user") == 1
    assert value(m, "policer_decisions_total", result="shadow_rejected", profile="total") == 0
    assert value(m, "policer_dialogs_ended_total", reason="bye") == 1
    assert value(m, "policer_dialogs_ended_total", reason="cancel") == 1
    assert value(m, "policer_dialogs_ended_total", reason="released_by_operator") == 1
    assert value(m, "policer_dialogs_ended_total", reason="expired") == 0
    # worker metrics, from the multiprocess directory
    decided = sum(v for (n, _), v in m.items() if n == "policer_decision_seconds_count")
    assert decided == 7
    assert value(m, "policer_decision_seconds_count", result="store_error") == 1
    assert value(m, "policer_store_errors_total", op="admit") == 1
    assert value(m, "policer_fallback_decisions_total", admitted="true") == 1


def test_dashboard_queries_name_metrics_the_exporter_serves(
        exporter: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = exporter
    served = {name for name, _ in scrape(url)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "policer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
    named = {n for e in exprs for n in re.findall(r"\bpolicer_[a-z_]+", e)}
    assert named - served == set()
    # the panels the issue asks for
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for want in ("utilization", "admitted / rejected", "early vs confirmed", "latency",
                 "store errors"):
        assert want in titles


def test_near_limit_shows_in_a_metric_and_logs_once(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    policy = policy_copy(tmp_path, namespace, replace={
        "total: {max: 100, reserve_for_emergency: 10}":
            "total: {max: 10, reserve_for_emergency: 1}"})
    env = {"POLICER_REDIS_URL": redis_url, "POLICER_POLICY": str(policy)}
    for i in range(8):
        run_cli("admit", "--from", f"u{i}", "--to", "5551234", env=env, check=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "policer", "exporter", "--listen", f"127.0.0.1:{port}"],
        env=dict(os.environ, **env, POLICER_LOG_LEVEL="info", POLICER_LOG_FORMAT="json"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(100):
            try:
                m = scrape(url)
                break
            except OSError:
                time.sleep(0.1)
        assert value(m, "policer_profile_near_limit", profile="total", value="") == 1
        assert value(m, "policer_profile_near_limit", profile="international", value="") == 0
        scrape(url)
        scrape(url)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    near = [e for e in log_events(err) if e.get("event") == "near_limit"]
    assert len(near) == 1 and near[0]["profile"] == "total" and near[0]["count"] == 8


def test_call_record_has_billsec_and_is_written_once(redis_url: str, namespace: str,
                                                     tmp_path: Path) -> None:
    from policer.call import Call
    from policer.engine import Engine
    from policer.policy import load_policy
    from policer.store import RedisStore

    path = policy_copy(tmp_path, namespace)
    store = RedisStore(redis_url, namespace, timeout_ms=5000)
    engine = Engine(load_policy(path), store, node="proxy-b")
    d = engine.admit(Call.from_raw("cdr-1", "ft", from_user="alice", from_domain="ex.net",
                                   ruri_user="0301234567"))
    store.clock_offset_ms += 2_000  # rings for 2 s
    assert engine.confirm(d.dialog_id)
    engine.set_var(d.dialog_id, "billing", "gold")
    store.clock_offset_ms += 65_000  # talks for 65 s
    rec = engine.release(d.dialog_id, "bye")
    assert rec is not None and rec.bill_sec == 65
    assert engine.release(d.dialog_id, "bye") is None
    records = [json.loads(line) for line in run_cli(
        "cdr", "tail", "--json", env={"POLICER_REDIS_URL": redis_url,
                                      "POLICER_POLICY": str(path)}).stdout.splitlines()]
    assert len(records) == 1
    r = records[0]
    assert (r["CallID"], r["From"], r["To"], r["BillSec"], r["Reason"], r["Node"]) == (
        "cdr-1", "alice@ex.net", "0301234567", 65, "bye", "proxy-b")
    assert r["AnswerTime"] - r["SetupTime"] == pytest.approx(2, abs=0.05)
    assert r["EndTime"] - r["AnswerTime"] == pytest.approx(65, abs=0.05)
    assert r["Variables"] == {"billing": "gold"} and "domestic" in r["Profiles"]
    # never answered: BillSec 0
    d2 = engine.admit(Call.from_raw("cdr-2", "ft", from_user="bob", ruri_user="123"))
    rec2 = engine.release(d2.dialog_id, "cancel")
    assert rec2 is not None and rec2.bill_sec == 0 and rec2.answer_ms == 0


def test_shadow_limit_admits_counts_and_logs(tmp_path: Path, redis_url: str,
                                             namespace: str) -> None:
    policy = policy_copy(tmp_path, namespace, replace={
        "user: {max: 3}": "user: {max: 1, shadow: true}"})
    env = {"POLICER_REDIS_URL": redis_url, "POLICER_POLICY": str(policy)}
    first = cli_json("admit", "--from", "erin", "--to", "5551234", env=env)
    assert first["admitted"] and not first["shadow"]
    proc = run_cli("admit", "--from", "erin", "--to", "5551234", "--json", env=env)
    assert proc.returncode == 0
    second = json.loads(proc.stdout)
    assert second["admitted"] and second["shadow"] and second["limit"] == "user"
    events = [e for e in log_events(proc.stderr) if e.get("event") == "decision"]
    assert events and events[0]["shadow"] is True and events[0]["limit"] == "user"
    assert run_cli("profile", "size", "user", "erin", env=env).stdout == "2\n"
    assert cli_json("stats", env=env)["shadow_rejected"] == 1


def test_top_once_shows_every_profile(day: dict[str, str]) -> None:
    proc = run_cli("top", "--once", "--interval", "0.2", env=day)
    assert proc.returncode == 0, proc.stderr
    frame = proc.stdout
    for profile in ("total", "emergency", "international", "domestic", "local", "user",
                    "account"):
        assert re.search(rf"^{profile}\s+\d+", frame, re.M), profile
    assert re.search(r"^total\s+2\s+100\s+\[", frame, re.M)
    assert "user=alice" in frame and "2 active" in frame


def test_rejection_log_line_names_call_and_limit(tmp_path: Path, redis_url: str,
                                                 namespace: str) -> None:
    env = {"POLICER_REDIS_URL": redis_url,
           "POLICER_POLICY": str(policy_copy(tmp_path, namespace))}
    for _i in range(3):
        run_cli("admit", "--from", "frank", "--to", "5551234", env=env, check=True)
    proc = run_cli("admit", "--from", "frank", "--to", "5551234", "--call-id", "rej-1", env=env)
    assert proc.returncode == 1
    ev = next(e for e in log_events(proc.stderr) if e.get("event") == "decision")
    assert (ev["call_id"], ev["admitted"], ev["limit"], ev["count"], ev["max"]) == (
        "rej-1", False, "user", 3, 3)
    assert ev["dialog_id"].startswith("rej-1;") and ev["level"] == "info"
    assert "latency_us" in ev and ev["memberships"][:1] == ["total"]
