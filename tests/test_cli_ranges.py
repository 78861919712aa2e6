"""Every number the command line stores or sends is checked against its range: out
of range is a usage error (exit 2, one clear line, no traceback) and nothing is
stored. The ranges of live limits are those a policy file may hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from policer.cli import (
    MAX_CONCURRENT,
    MAX_RATE,
    MAX_RATE_PER_MS,
    MAX_ROWS,
    MAX_WINDOW_CALLS,
    MAX_WORKERS,
)
from policer.policy import PolicyError
from tests.support import POLICIES, policy_text
from tests.support.cli import cli_json, policy_copy, run_cli

V2 = POLICIES / "v2.yaml"  # account: rate and calendar windows (1d, 1h)
BIG = "100000000000000000000"  # 10**20: over a signed 64-bit integer


@pytest.fixture
def env(tmp_path: Path, redis_url: str, namespace: str) -> dict[str, str]:
    return {"POLICER_REDIS_URL": redis_url,
            "POLICER_POLICY": str(policy_copy(tmp_path, namespace, source=V2))}


OUT_OF_RANGE = [
    # live limits: what a policy file may hold
    (("limits", "set", "account", "acme", BIG), "argument MAX"),
    (("limits", "set", "account", "acme", str(MAX_CONCURRENT + 1)), "argument MAX"),
    (("limits", "set", "account", "acme", "-1"), "argument MAX"),
    (("limits", "set", "account", "acme", "--rate", f"{MAX_RATE + 1}/s"), "--rate"),
    (("limits", "set", "account", "acme", "--rate", "0/s"), "--rate"),
    (("limits", "set", "account", "acme", "--rate", f"{BIG}/s"), "--rate"),
    (("limits", "set", "account", "acme", "--rate", "²/s"), "--rate"),
    (("limits", "set", "account", "acme", "--rate", "1/2d"), "--rate"),
    (("limits", "set", "account", "acme", "--rate", "10/s", "--burst", BIG), "--burst"),
    (("limits", "set", "account", "acme", "--rate", "10/s", "--burst", "0"), "--burst"),
    (("limits", "set", "account", "acme", "--calls", f"{MAX_WINDOW_CALLS + 1}/1d"),
     "--calls"),
    (("limits", "set", "account", "acme", "--calls", f"{BIG}/1d"), "--calls"),
    (("limits", "set", "account", "acme", "--calls", "-5/1d"), "--calls"),
    (("limits", "set", "account", "acme", "--calls", "²/1d"), "--calls"),
    # counts, rows, intervals and times
    (("cdr", "tail", "-n", "-1"), "-n/--count"),
    (("cdr", "tail", "-n", BIG * 300), "-n/--count"),
    (("cdr", "tail", "-f", "--interval", "-1"), "--interval"),
    (("top", "--once", "--interval", "-1"), "--interval"),
    (("top", "--once", "--interval", "nan"), "--interval"),
    (("top", "--once", "--interval", "inf"), "--interval"),
    (("top", "--once", "--top", "-1"), "--top"),
    (("top", "--once", "--top", str(MAX_ROWS + 1)), "--top"),
    (("exporter", "--top", "-1"), "--top"),
    (("replay", "--policy", str(V2), "--top", "-1"), "--top"),
    (("replay", "--policy", str(V2), "--since", "²"), "--since"),
    (("replay", "--policy", str(V2), "--until", BIG), "--until"),
    (("replay", "--policy", str(V2), "--since", "1000000000d"), "--since"),
    (("explain", "--to", "123", "--at", "1900-01-01T00:00:00+00:00"), "--at"),
    (("reconcile", "--proxy", "a=unix:/nonexistent", "--timeout", "-1"), "--timeout"),
    # (a token file that is not there: never a server, whichever check fails)
    (("serve", "--workers", str(MAX_WORKERS + 1), "--token-file", "/nonexistent"),
     "--workers"),
    (("serve", "--workers", "0", "--token-file", "/nonexistent"), "--workers"),
]


@pytest.mark.parametrize(("args", "names"), OUT_OF_RANGE,
                         ids=[" ".join(a)[:60] for a, _ in OUT_OF_RANGE])
def test_a_number_out_of_range_is_a_usage_error(env: dict[str, str], args: tuple[str, ...],
                                                names: str) -> None:
    proc = run_cli(*args, env=env, timeout=30)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert names in proc.stderr, proc.stderr
    assert proc.stdout == ""
    if args[0] == "limits":  # nothing was stored
        assert cli_json("limits", "get", "account", env=env)["limits"] == {}


def test_the_bounds_themselves_are_accepted(env: dict[str, str]) -> None:
    set_ = ("limits", "set", "account", "acme")
    run_cli(*set_, str(MAX_CONCURRENT), env=env, check=True)
    assert cli_json("limits", "get", "account", "acme", env=env)["live"] == MAX_CONCURRENT
    run_cli(*set_, "0", env=env, check=True)
    run_cli(*set_, "--rate", f"{MAX_RATE}/1d", "--burst", str(MAX_RATE), env=env, check=True)
    run_cli(*set_, "--rate", "1/1ms", env=env, check=True)
    run_cli(*set_, "--calls", f"{MAX_WINDOW_CALLS}/1d", env=env, check=True)
    run_cli(*set_, "--calls", "0/1h", env=env, check=True)
    for args in (("cdr", "tail", "-n", "0"), ("top", "--once", "--interval", "0.1", "--top",
                                              str(MAX_ROWS)),
                 ("replay", "--policy", str(V2), "--since", "0", "--top", "0")):
        assert run_cli(*args, env=env).returncode == 0, args


def test_cdr_tail_n_counts_from_the_end(env: dict[str, str]) -> None:
    for i in range(3):
        run_cli("admit", "--call-id", f"n{i}", "--from-tag", "t", "--to", "5551234",
                env=env, check=True)
        run_cli("release", "--call-id", f"n{i}", "--from-tag", "t", env=env, check=True)
    tail = run_cli("cdr", "tail", "-n", "2", env=env, check=True).stdout.splitlines()
    assert [ln.rsplit("call-id=", 1)[1].split()[0] for ln in tail] == ["n1", "n2"]


def test_live_limit_ranges_are_those_of_a_policy_file() -> None:
    """The CLI's bounds stay in step with what a policy may say."""
    def policy(limit: str) -> None:
        policy_text(f"""
            version: 2
            namespace: ranges
            profiles: {{account: {{value: from_user}}}}
            limits: {{account: {limit}}}
            """)

    assert MAX_RATE_PER_MS == 86_400_000  # 1d
    for ok, bad in ((f"{{max: {MAX_CONCURRENT}}}", f"{{max: {MAX_CONCURRENT + 1}}}"),
                    (f"{{rate: {{max: {MAX_RATE}, per: 1d, burst: {MAX_RATE}}}}}",
                     f"{{rate: {{max: 10, per: 1d, burst: {MAX_RATE + 1}}}}}"),
                    ("{rate: {max: 1, per: 1d}}", "{rate: {max: 1, per: 2d}}"),
                    (f"{{calls: {{max: {MAX_WINDOW_CALLS}, per: 1d}}}}",
                     f"{{calls: {{max: {MAX_WINDOW_CALLS + 1}, per: 1d}}}}")):
        policy(ok)
        with pytest.raises(PolicyError):
            policy(bad)
