"""Issue 5, proxy crashes: two proxies, one Redis; proxy A is killed with SIGKILL
(its whole process group: main process, workers, timers) while it carries calls.

* Calls whose BYE comes later reach proxy B, as they would behind a load
  balancer: both proxies Record-Route the balancer's shared address
  (``POLICER_RECORD_ROUTE``) and accept it as their own, so the Route set of a
  dialog does not name the proxy that set it up. B does not know the dialog
  (it lives in A's memory), relays the BYE along the Route set anyway, and
  releases the call in policer (``route(POLICER_IN_DIALOG)``).
* Calls that never get a BYE stop counting once A's node lease lapses (3 s in
  the test policy): B's timer (``engine.tick()``) ends them (reason ``node_lost``).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from lab.redis_server import free_udp_port
from tests.support import wait_for
from tests.support.e2e import Lab, Proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def _two_proxies(lab: Lab, lease: str) -> tuple[Proxy, Proxy]:
    lab.use_policy(lease)
    uas = lab.start_uas("uas_via.xml")  # answers the BYE to whoever relayed it (per Via)
    balancer = f"127.0.0.1:{free_udp_port()}"  # the shared address both proxies Record-Route
    env = {"POLICER_RECORD_ROUTE": balancer}
    a = lab.start_proxy(upstream_port=uas.port, node="proxy-a", env=env)
    b = lab.start_proxy(upstream_port=uas.port, node="proxy-b", env=env)
    return a, b


def _crash(proxy: Proxy) -> float:
    proxy.kill9()
    # every process of the group gets SIGKILL at once; they are gone when reaped
    assert wait_for(lambda: proxy.processes() == [], 5), proxy.processes()
    return time.monotonic()


def test_bye_via_another_proxy_releases_calls_of_a_killed_proxy(lab: Lab) -> None:
    a, b = _two_proxies(lab, "lease_long")  # lease 60s: only the BYEs can release here
    uac = lab.start_uac(
        a, [(f"bye{i}", "", "6000") for i in range(3)], scenario="uac_failover.xml",
        hold_ms=3000, extra=["-set", "bye_host", "127.0.0.1", "-set", "bye_port", str(b.port)],
    )
    assert lab.wait_size("total", 3, timeout=5) == 3
    assert a.active_dialogs() == 3 and b.active_dialogs() == 0
    _crash(a)
    assert lab.size("total") == 3  # nothing forgets them yet

    res = uac.result()  # the BYEs went to B, which relayed them along the Route set ...
    assert res.returncode == 0, res.output
    assert len(res.answered) == 3 and len(res.ended) == 3
    assert lab.wait_size("total", 0, timeout=2) == 0  # ... and released them
    reasons = Counter(c["Reason"] for c in lab.cdrs() if c.get("CallID") in res.answered)
    assert reasons == Counter(bye=3)
    assert b.alive() and b.active_dialogs() == 0


def test_calls_of_a_killed_proxy_stop_counting_within_the_lease(lab: Lab) -> None:
    a, b = _two_proxies(lab, "lease")  # nodes: {lease: 3s, renew: 1s}
    res = lab.run_uac(a, [(f"nobye{i}", "", "6001") for i in range(2)],
                      scenario="uac_nobye.xml")
    assert len(res.answered) == 2
    assert lab.wait_size("total", 2, timeout=5) == 2
    killed_at = _crash(a)
    assert lab.size("total") == 2  # counted until the lease lapses

    # B's timer (engine.tick) ends the lost node's dialogs: lease + renew period + slack
    assert lab.wait_size("total", 0, timeout=3 + 1 + 4) == 0
    assert time.monotonic() - killed_at >= 1.5  # not before A's lease could lapse
    reasons = Counter(c["Reason"] for c in lab.cdrs() if c.get("CallID") in res.answered)
    assert reasons == Counter(node_lost=2)
    assert lab.stats()["active"] == 0
    assert b.alive()
