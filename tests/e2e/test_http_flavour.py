"""The Kamailio ``http`` flavour end to end: the SIPp scenarios the native flavour
passes (``test_kamailio.py``), through ``deploy/kamailio/run`` with
``POLICER_KAMAILIO_FLAVOUR=http``: Kamailio asks ``policer serve`` (started by run)
over HTTP with ``http_client``; real Redis, real SIPp, nothing mocked.

Run: ``.venv/bin/pytest -m e2e tests/e2e/test_http_flavour.py``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.redis_server import RedisServer
from tests.support.e2e import Lab, UacResult

from .test_kamailio import (
    test_account_user_and_class_caps,
    test_busy_cancelled_and_unanswered_calls_are_released,
    test_emergency_admitted_when_full_and_counted,
    test_hostile_header_values_count_under_their_own_value,
    test_kamailio_dialog_timeout_releases,
    test_store_error_answers_by_policy_and_logs_call_id,
    test_total_limit_admits_exactly_n,
    test_two_proxies_share_one_limit,
    test_upstream_auth_counts_the_call_once,
)
from .test_live_counts import (
    test_a_paused_redis_leaves_no_ghost_call,
    test_a_proxy_whose_clock_is_off_decides_normally,
    test_a_second_proxy_with_the_same_node_name_refuses_to_start,
    test_redis_restarted_empty_gets_the_live_calls_back,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

__all__ = [
    "test_a_paused_redis_leaves_no_ghost_call",
    "test_a_proxy_whose_clock_is_off_decides_normally",
    "test_a_second_proxy_with_the_same_node_name_refuses_to_start",
    "test_account_user_and_class_caps",
    "test_busy_cancelled_and_unanswered_calls_are_released",
    "test_emergency_admitted_when_full_and_counted",
    "test_hostile_header_values_count_under_their_own_value",
    "test_kamailio_dialog_timeout_releases",
    "test_redis_restarted_empty_gets_the_live_calls_back",
    "test_store_error_answers_by_policy_and_logs_call_id",
    "test_total_limit_admits_exactly_n",
    "test_two_proxies_share_one_limit",
    "test_upstream_auth_counts_the_call_once",
]


@pytest.fixture
def lab(request: pytest.FixtureRequest, e2e_redis: RedisServer, tmp_path: Path) -> Iterator[Lab]:
    """The harness of conftest.py with the http flavour (overrides its ``lab``)."""
    the_lab = Lab("http", e2e_redis.url, tmp_path)
    try:
        yield the_lab
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            sys.stderr.write(
                f"\n===== e2e diagnostics ({request.node.name})\n{the_lab.diagnostics()}\n"
            )
        the_lab.close()


def test_the_service_is_down_the_cfg_decides_by_on_store_error(lab: Lab) -> None:
    """policer serve hangs (not its Redis): after http_client's one-second bound the
    cfg's own fallback decides, the policy's on_store_error (emergency: reject),
    emergency numbers still admitted. (A service that exits ends run, and so the
    proxy, as a crash of Kamailio would.)"""
    lab.use_policy("emergency")
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)
    serve = [pid for pid in proxy.processes() if "policer" in _cmdline(pid)
             and "serve" in _cmdline(pid)]
    assert serve, "run started no policer serve"
    for pid in serve:
        os.kill(pid, signal.SIGSTOP)
    res: UacResult = lab.run_uac(proxy, [("alice", "", "5550"), ("e1", "", "112")],
                                 hold_ms=500)
    assert res.returncode == 0, res.output
    assert [c[2] for c in res.answered_calls()] == ["112"]
    assert [(c[2], code) for c, code, _ in res.rejected_calls()] == [("5550", 503)]
    assert "policer serve did not decide" in proxy.log.read_text(errors="replace")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _serve_pids(proxy: object) -> list[int]:
    pids = []
    for pid in proxy.processes():  # type: ignore[attr-defined]
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and any(b"policer" in c for c in cmd):
            pids.append(pid)
    return pids


def test_a_stalled_service_leaves_no_ghost_call(lab: Lab) -> None:
    """The other hop: Kamailio's http_client gives up on a stalled policer serve (1 s)
    and its fallback rejects; the admits the service reads once it resumes carry the
    worker's clock and how long it waited, so they write nothing, and the settlement
    the cfg queued makes them void anyway."""
    lab.use_policy("stall")
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)
    pids = _serve_pids(proxy)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        res = lab.run_uac(proxy, [(f"h{i}", "acme", "5551234") for i in range(2)],
                          rate=5, timeout=20)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert [code for _, code, _ in res.rejected_calls()] == [503, 503]
    time.sleep(2.5)  # the service reads the stale admits, then the queued settlements
    # what counts is what Kamailio carries: INVITE retransmissions that waited for a
    # worker meanwhile were decided normally once the service answered (and relayed)
    assert lab.size("total") == proxy.active_dialogs() == lab.stats()["active"]
    assert "POLICER late" in proxy.log.read_text(errors="replace")
