"""A count is a live call after any fault (issue 15), through real Kamailio proxies,
both flavours: a paused Redis leaves no ghost call, a Redis restarted empty gets the
proxy's live calls back with no command run, a proxy whose clock is seconds off Redis's
has its calls decided normally, and a second Kamailio with the same node name refuses
to start."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from lab.redis_server import RedisServer
from tests.support.e2e import Lab

from .test_queue import wait_library

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def _listed(lab: Lab, profile: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(lab.policer("profile", "list", profile,
                                                          "--json"))
    return out


def test_a_paused_redis_leaves_no_ghost_call(lab: Lab) -> None:
    """Redis frozen: the proxy rejects the INVITEs by its fallback (503), yet each
    request sits in Redis's socket; when Redis resumes they are applied late and write
    nothing. Before this fix two of three were counted, early, for 120 s."""
    lab.use_policy("stall")
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        assert wait_library(lab, 5)
        private.signal(signal.SIGSTOP)
        try:
            res = lab.run_uac(proxy, [(f"g{i}", "acme", "5551234") for i in range(3)],
                              rate=10, timeout=15)
        finally:
            private.signal(signal.SIGCONT)
        assert res.returncode != 0 or not res.answered
        assert [code for _, code, _ in res.rejected_calls()] == [503, 503, 503]
        time.sleep(1.5)  # the queued settlements are applied within a timer's run
        assert lab.size("total") == 0 and lab.size("account", "acme") == 0
        assert _listed(lab, "total") == []
        assert lab.stats()["active"] == 0
        assert proxy.active_dialogs() == 0
        # the INVITE sent again after the stall is decided normally
        again = lab.run_uac(proxy, [("g0", "acme", "5551234")], hold_ms=300)
        assert len(again.answered) == 1
        assert lab.wait_size("total", 0, timeout=5) == 0


def test_redis_restarted_empty_gets_the_live_calls_back(lab: Lab) -> None:
    """No command run by anyone: within 5 s of the restart the proxy has put its calls
    back (its timer notices the loss, loads the library, lists its dialogs), and no
    limit was decided on the empty counts meanwhile. Sixteen calls: their dialog list
    is longer than Kamailio's default 8 KB buffer (the http flavour's cfg sent none of
    it and put no call back)."""
    lab.use_policy("classes")  # user max 1, account max 2
    others = [(f"x{i}", f"other{i}", f"555{i:03d}") for i in range(14)]
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        lab.start_uac(proxy, [("alice", "acme", "5551"), ("bob", "acme", "0301234"), *others],
                      hold_ms=25_000)
        assert lab.wait_size("total", 16, timeout=10) == 16
        private.restart()  # empty: every count is gone, the calls are still up
        t0 = time.monotonic()
        assert lab.wait_size("total", 16, timeout=8) == 16
        assert time.monotonic() - t0 < 5
        assert lab.size("account", "acme") == 2 and lab.size("user", "alice") == 1
        # every profile back, not only the one the test watched
        assert [lab.size(p) for p in ("local", "domestic", "user", "account")] == \
            [15, 1, 16, 16]
        # the account is full again: a third call of acme is rejected by its limit
        res = lab.run_uac(proxy, [("carol", "acme", "5552")], timeout=20)
        assert [code for _, code, _ in res.rejected_calls()] in ([486], [503])


@pytest.mark.parametrize("offset", ["+5s", "-5s"])
def test_a_proxy_whose_clock_is_off_decides_normally(lab: Lab, offset: str) -> None:
    if not FAKETIME.exists():
        pytest.fail("libfaketime is missing (Debian package faketime; bin/setup installs it)")
    lab.use_policy("stall")
    uas = lab.start_uas("uas.xml")
    env = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": offset,
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}
    proxy = lab.start_proxy(upstream_port=uas.port, env=env)
    res = lab.run_uac(proxy, [(f"s{i}", "acme", "5551234") for i in range(3)],
                      hold_ms=500)
    assert len(res.answered) == 3, res.output
    assert "store_error" not in proxy.log.read_text(errors="replace")
    assert lab.wait_size("total", 0, timeout=5) == 0
    # the node's skew, as it measured it, for the exporter and policer stats
    skews = json.loads(lab.policer("stats", "--json"))["clock_skew_seconds"]
    assert abs(skews[proxy.node] - float(offset[:-1])) < 0.5


def test_a_second_proxy_with_the_same_node_name_refuses_to_start(lab: Lab) -> None:
    lab.use_policy("stall")
    uas = lab.start_uas("uas.xml")
    first = lab.start_proxy(upstream_port=uas.port, node="edge-1")
    uac = lab.start_uac(first, [("n1", "acme", "5551234")], hold_ms=15_000)
    assert lab.wait_size("total", 1, timeout=8) == 1
    with pytest.raises(RuntimeError) as e:
        lab.start_proxy(upstream_port=uas.port, node="edge-1", ready_timeout=15)
    assert "edge-1" in str(e.value) and "POLICER_NODE" in str(e.value)
    assert first.alive() and lab.size("total") == 1  # the first one's call still counts
    assert first.active_dialogs() == 1
    uac.process.kill()
