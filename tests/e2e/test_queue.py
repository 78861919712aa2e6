"""Issue 8 through real Kamailio: answers and ends are queued by the proxy and
applied in batches (never by a SIP worker waiting for Redis), a batch Redis did
not take is sent again, and calls the proxy admitted while Redis was down
(emergency numbers, always) are counted once Redis is back. Both flavours; the
native one does all of it in its cfg (``deploy/kamailio/policer.cfg``).
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter

import pytest
import redis

from lab.redis_server import RedisServer
from policer.compile import compile_policy
from policer.policy import load_policy
from policer.store import RedisStore
from tests.support import wait_for
from tests.support.e2e import Lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def _store(lab: Lab) -> RedisStore:
    """A store reading the lab's Redis directly (faster than the CLI: for timing)."""
    assert lab.policy_path is not None
    policy = load_policy(lab.policy_path)
    store = RedisStore(lab.redis_url, policy.namespace, 2000)
    store.use(policy)
    return store


def wait_library(lab: Lab, timeout: float) -> bool:
    """Until the policy's library is loaded in the lab's Redis (by a proxy's timer)."""
    assert lab.policy_path is not None
    name = compile_policy(load_policy(lab.policy_path)).name
    client = redis.Redis.from_url(lab.redis_url, socket_timeout=1)

    def loaded() -> bool:
        try:
            return bool(client.function_list(library=name))
        except redis.RedisError:
            return False

    try:
        return wait_for(loaded, timeout, interval=0.05)
    finally:
        client.close()


def _reasons(lab: Lab, call_ids: list[str]) -> Counter[str]:
    wanted = set(call_ids)
    return Counter(c["Reason"] for c in lab.cdrs() if c.get("CallID") in wanted)


def test_releases_are_applied_in_batches_shortly_after_bye(lab: Lab) -> None:
    lab.use_policy("classes")  # total max 100
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)
    store = _store(lab)
    calls = [(f"b{i}", "", f"55{i:02d}") for i in range(10)]
    uac = lab.start_uac(proxy, calls, hold_ms=1500, rate=100)
    assert wait_for(lambda: store.profile_size("total") == 10, 10, interval=0.02)
    # every call answered: the confirms were applied (queued, then one batch or a few)
    assert wait_for(lambda: store.stats()["confirmed"] == 10, 2, interval=0.02)

    # the BYEs all come within about 100 ms; SIPp ends when their 200s are in
    res = uac.result()
    assert res.returncode == 0, res.output
    assert len(res.answered) == 10 and len(res.ended) == 10
    t0 = time.monotonic()
    assert wait_for(lambda: store.profile_size("total") == 0, 2, interval=0.01)
    # queued and applied by the 100 ms timer, not in the SIP workers; generous bound for
    # a busy 2-core machine (the BYEs themselves were released before SIPp ended)
    assert time.monotonic() - t0 < 0.5
    assert _reasons(lab, res.answered) == Counter(bye=10)
    if lab.flavour == "native":
        # the cfg counted its batches: 10 confirms and 10 releases, fewer batches than ops
        counters = proxy.kamcmd("cnt.grp_get_all", "script")
        ops = int(re.search(r"policer_ops: (\d+)", counters).group(1))  # type: ignore[union-attr]
        batches = int(re.search(r"policer_batches: (\d+)", counters).group(1))  # type: ignore[union-attr]
        assert ops == 20 and 1 <= batches < ops
    store.close()


def test_a_batch_redis_did_not_take_is_sent_again(lab: Lab) -> None:
    lab.use_policy("basic")  # store_timeout 2s
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        uac = lab.start_uac(proxy, [("r1", "", "7001"), ("r2", "", "7002")], hold_ms=2500)
        assert lab.wait_size("total", 2, timeout=5) == 2
        private.signal(signal.SIGSTOP)  # Redis frozen: the releases cannot be applied
        try:
            res = uac.result()  # the BYEs went through the proxy meanwhile
            assert res.returncode == 0, res.output
            assert len(res.ended) == 2
            log = proxy.log.read_text(errors="replace")
            assert wait_for(lambda: "store_error" in proxy.log.read_text(errors="replace"),
                              8), log[-2000:]
        finally:
            private.signal(signal.SIGCONT)
        # the kept batch goes again and the count drops (nothing was lost meanwhile)
        assert lab.wait_size("total", 0, timeout=8) == 0
        assert _reasons(lab, res.answered) == Counter(bye=2)
        assert lab.stats()["active"] == 0


def test_emergency_calls_admitted_while_redis_is_down_are_counted_once_it_is_back(
        lab: Lab) -> None:
    lab.use_policy("emergency")  # on_store_error: reject; 112 and 911 always admitted
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        private.kill()  # Redis down after the proxy started
        uac = lab.start_uac(proxy, [("e1", "", "112"), ("e2", "", "911"), ("n1", "", "5550")],
                            hold_ms=6000)
        # both emergency calls are up (answered by the UAS) while Redis is still down
        assert wait_for(lambda: sum(line.startswith("INVITE ") for line in uas.lines()) == 2,
                          5)
        private.start()  # back, empty: the timer loads the library within a second ...
        assert wait_library(lab, 3)
        # ... and the calls the proxy admitted meanwhile are counted (then answered)
        assert lab.wait_size("emergency", 2, timeout=5) == 2
        assert lab.size("total") == 2
        assert wait_for(lambda: lab.stats()["confirmed"] == 2, 3, interval=0.2)
        res = uac.result()
        assert res.returncode == 0, res.output
        assert sorted(c[2] for c in res.answered_calls()) == ["112", "911"]
        assert [(c[2], code) for c, code, _ in res.rejected_calls()] == [("5550", 503)]
        assert lab.wait_size("total", 0, timeout=5) == 0
        assert _reasons(lab, res.answered) == Counter(bye=2)
        assert lab.stats()["recorded"] == 2
