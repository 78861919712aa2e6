"""The command line and the exporter with a policy v2 (rates, calendar caps, schedules,
max duration), as an operator uses them: ``admit --json``, ``explain --at``, ``limits
set --rate/--calls``, ``profile size``, ``top`` and the exporter's families."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.redis_server import free_port
from tests.support.cli import ROOT, cli_json, log_events, policy_copy, run_cli

V2 = ROOT / "policies" / "v2.yaml"
TRUNK = "192.0.2.10"


@pytest.fixture
def env(tmp_path: Path, redis_url: str, namespace: str) -> dict[str, str]:
    return {"POLICER_REDIS_URL": redis_url,
            "POLICER_POLICY": str(policy_copy(tmp_path, namespace, V2))}


def admit(env: dict[str, str], call_id: str, *args: str) -> dict[str, object]:
    out = cli_json("admit", "--call-id", call_id, "--from-tag", "t", *args, env=env)
    assert isinstance(out, dict)
    return out


def test_admit_json_names_kind_window_and_max_duration(env: dict[str, str]) -> None:
    ok = admit(env, "c1", "--from", "alice", "--to", "0301234567", "--source-ip", TRUNK,
               "--header", "X-Account: acme")
    assert ok["admitted"] is True and ok["kind"] is None and ok["window"] is None
    assert ok["max_duration"] == 4 * 3600  # timeouts.max_duration default
    intl = admit(env, "c2", "--from", "alice", "--to", "0044163296", "--source-ip", TRUNK)
    assert intl["max_duration"] == 2 * 3600  # international: 2h
    # a live 1-call daily cap for acme: the second call is over it
    run_cli("limits", "set", "account", "acme", "--calls", "1/1d", env=env, check=True)
    over = admit(env, "c3", "--from", "alice", "--to", "0301234567", "--header",
                 "X-Account: acme")
    assert (over["admitted"], over["code"], over["limit"], over["kind"], over["window"]) == (
        False, 486, "account", "calls", "1d")
    assert isinstance(over["retry_after"], int) and 1 <= over["retry_after"] <= 25 * 3600


def test_live_rate_is_audited_rejects_with_retry_after_and_unset_restores(
        env: dict[str, str]) -> None:
    proc = run_cli("limits", "set", "trunk", TRUNK, "--rate", "1/1h", "--burst", "1",
                   env=env, check=True)
    audit = [e for e in log_events(proc.stderr) if e.get("event") == "live_limit_changed"]
    assert audit and audit[0]["kind"] == "rate" and audit[0]["new"] == "1/1h burst 1"
    assert audit[0]["policy_default"] == "10/1s"
    first = admit(env, "r1", "--from", "bob", "--to", "5551234", "--source-ip", TRUNK)
    second = admit(env, "r2", "--from", "bob", "--to", "5551234", "--source-ip", TRUNK)
    assert first["admitted"] is True
    assert (second["admitted"], second["code"], second["reason"], second["kind"]) == (
        False, 503, "Call Rate Exceeded", "rate")
    assert isinstance(second["retry_after"], int) and 3000 < second["retry_after"] <= 3600
    # another trunk is not affected
    assert admit(env, "r3", "--from", "bob", "--to", "5551234",
                 "--source-ip", "192.0.2.11")["admitted"] is True
    run_cli("limits", "unset", "trunk", TRUNK, "--rate", env=env, check=True)
    # back to the policy's 10/s: the debt of the stricter rate does not outlive it
    assert admit(env, "r4", "--from", "bob", "--to", "5551234",
                 "--source-ip", TRUNK)["admitted"] is True


def test_calls_cap_for_a_window_the_policy_lacks_is_refused(env: dict[str, str]) -> None:
    proc = run_cli("limits", "set", "account", "acme", "--calls", "10/1mo", env=env)
    assert proc.returncode == 2
    assert "no '1mo' window" in proc.stderr and "1d, 1h" in proc.stderr


def test_explain_at_picks_the_scheduled_entry(env: dict[str, str]) -> None:
    args = ("explain", "--from", "carol", "--to", "0044163296")
    day = cli_json(*args, "--at", "2026-12-01T09:30:00+01:00", env=env)   # a Tuesday
    night = cli_json(*args, "--at", "2026-12-01T23:30:00+01:00", env=env)
    def intl(x: dict[str, object]) -> dict[str, object]:
        rows = [v for v in x["limits"] if v["profile"] == "international"]  # type: ignore[attr-defined]
        assert len(rows) == 1
        return rows[0]  # type: ignore[no-any-return]
    assert intl(day)["max"] == 200 and intl(night)["max"] == 50
    bad = run_cli(*args, "--at", "2026-12-01T09:30:00", env=env)
    assert bad.returncode == 2 and "no UTC offset" in bad.stderr


def test_profile_size_top_and_exporter_show_rate_and_calendar_usage(
        env: dict[str, str]) -> None:
    # a slow live rate, so that the three calls still show as owed (3 of a burst of 5)
    run_cli("limits", "set", "trunk", TRUNK, "--rate", "1/1h", "--burst", "5", env=env,
            check=True)
    for i in range(3):
        assert admit(env, f"u{i}", "--from", "dave", "--to", "5551234", "--source-ip", TRUNK,
                     "--header", "X-Account: acme")["admitted"] is True
    size = cli_json("profile", "size", "account", "acme", env=env)
    assert size["size"] == 3 and size["calls"] == {"1h": 3, "1d": 3}
    trunk = cli_json("profile", "size", "trunk", TRUNK, env=env)
    assert trunk["size"] == 3 and 0.55 < trunk["rate_usage"] <= 0.6
    top = run_cli("top", "--once", "--interval", "0.1", env=env, check=True).stdout
    assert "1d 3/5000" in top and "rate" in top
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policer", "exporter", "--listen",
                             f"127.0.0.1:{port}", "--values", f"account=acme,trunk={TRUNK}"],
                            env=dict(env, PATH="/usr/bin:/bin"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=2).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples[("policer_profile_calls",
                    (("profile", "account"), ("value", "acme"), ("window", "1d")))] == 3
    assert samples[("policer_profile_calls_limit",
                    (("profile", "account"), ("value", "acme"), ("window", "1h")))] == 500
    assert 0.55 < samples[("policer_profile_rate_usage",
                           (("profile", "trunk"), ("value", TRUNK)))] <= 0.6


def test_top_marks_a_count_over_its_max_that_emergency_bypass_caused(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    env = {"POLICER_REDIS_URL": redis_url, "POLICER_POLICY": str(policy_copy(
        tmp_path, namespace, V2, {"total: {max: 2000, reserve_for_emergency: 100}":
                                  "total: {max: 1}"}))}
    assert admit(env, "o1", "--from", "erin", "--to", "5551234")["admitted"] is True
    sos = admit(env, "o2", "--from", "erin", "--to", "112")
    assert sos["admitted"] is True and sos["bypass"] is True
    top = run_cli("top", "--once", "--interval", "0.1", env=env, check=True).stdout
    line = next(ln for ln in top.splitlines() if ln.startswith("total "))
    assert "OVER (emergency bypass)" in line
