"""Faults injected into real processes: a Redis that is killed, paused or
restarted empty; a proxy node that stops renewing its lease; policy files
replaced while calls are decided. The proxy must never see an exception, and
no state may be lost."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from lab.redis_server import RedisServer
from policer.compile import RECOVERY_MS
from policer.engine import Engine
from policer.policy import Policy, load_policy
from policer.store import RedisStore
from tests.support import call, ticked, wait_for
from tests.support.cli import policy_copy
from tests.support.policies import ACCOUNT, EMERGENCY_112, build_policy


def make_policy(ns: str, on_error: str = "admit", queue: int = 1000, loss: str = "release",
                attributes: Mapping[str, str] = ACCOUNT) -> Policy:
    return build_policy(ns, attributes=attributes, classes=EMERGENCY_112,
                        profiles={"total": {}, "account": "account"},
                        limits={"total": 5, "account": 2}, on_store_error=on_error,
                        store_timeout="100ms", pending_queue=queue,
                        nodes={"lease": "30s", "renew": "5s", "on_node_loss": loss})


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may kill, pause and restart."""
    server = RedisServer().start()
    yield server
    server.stop()


def engine_on(server: RedisServer, ns: str, node: str = "proxy-a", lease: bool = False,
              **kw: str | int) -> Engine:
    policy = make_policy(ns, **kw)  # type: ignore[arg-type]
    return Engine(policy, RedisStore(server.url, ns, timeout_ms=policy.store_timeout_ms),
                  node=node, lease=lease)


def until(condition: Callable[[], object]) -> bool:
    """Poll a condition (liveness bound, not a timing assertion)."""
    return wait_for(condition, 15)



def test_redis_down_fail_open_then_counts_are_right_when_it_returns(
        own_redis: RedisServer, namespace: str) -> None:
    e = engine_on(own_redis, namespace)
    held = [e.admit(call("5551234", headers={"X-Account": "acme"})) for _ in range(2)]
    assert all(d.admitted and not d.fallback for d in held)
    own_redis.kill()
    # fail-open: admitted, flagged, no exception; the breaker opens after a few failures
    during = [e.admit(call("5551234", f"u{i}")) for i in range(6)]
    assert all(d.admitted and d.fallback for d in during)
    assert e.breaker.open
    assert "circuit open" in during[-1].error
    # a call that ended while Redis was down: its release waits in the queue
    e.release(held[0].dialog_id, "bye")
    e.release(during[0].dialog_id, "bye")
    assert len(e.pending) >= 2
    own_redis.start()  # same port, empty: scripts are loaded again transparently

    def recovered() -> bool:
        e.tick()  # the breaker lets a probe through every 250 ms
        return not e.breaker.open

    assert until(recovered)
    assert len(e.pending) == 0
    store = e.store
    # live now: the 6 fail-open calls were recorded, and during[0]'s release applied
    # after its record; held[1] was in Redis before the restart and went with it (a
    # proxy's node puts its calls back: Engine.resync, from Kamailio's dlg.list)
    assert store.profile_size("total") == 5
    assert store.stats()["recorded"] == 6
    assert store.decisions()[("store_error", "total")] == 6
    # Redis lost its state: no limit is decided on its counts while the nodes put their
    # calls back (the fallback decides, and says why)
    held_back = e.admit(call("5551234", "held"))
    assert held_back.fallback and "recovering" in held_back.error
    store.clock_offset_ms += RECOVERY_MS  # type: ignore[attr-defined]
    # and then the limit holds on those counts: total max 5 is full (6 with held_back)
    after = e.admit(call("5551234", "after"))
    assert (after.fallback, after.admitted, after.limit) == (False, False, "total")


def test_fail_closed_rejects_but_emergency_always_goes_through(
        own_redis: RedisServer, namespace: str) -> None:
    e = engine_on(own_redis, namespace, on_error="reject")
    own_redis.kill()
    d = e.admit(call("5551234"))
    assert (d.admitted, d.fallback, d.code) == (False, True, 503)
    sos = e.admit(call("112"))
    assert sos.admitted and sos.fallback


def test_paused_redis_is_bounded_by_store_timeout_and_recovers(
        own_redis: RedisServer, namespace: str) -> None:
    e = engine_on(own_redis, namespace)
    assert not e.admit(call("5551234", "warm")).fallback
    own_redis.signal(signal.SIGSTOP)
    try:
        decided = [e.admit(call("5551234", f"p{i}")) for i in range(10)]
        assert all(d.admitted and d.fallback for d in decided)
        assert e.breaker.open
        # once open, calls are decided without touching the store
        assert sum("circuit open" in d.error for d in decided) >= 6
    finally:
        own_redis.signal(signal.SIGCONT)
    assert until(lambda: not e.admit(call("5551234", "after")).fallback)


def test_queue_full_drops_oldest_and_deadlines_still_clean_up(
        own_redis: RedisServer, namespace: str) -> None:
    e = engine_on(own_redis, namespace, queue=3)
    ds = [e.admit(call("5551234", f"q{i}")) for i in range(5)]
    own_redis.signal(signal.SIGSTOP)
    try:
        for d in ds:
            e.release(d.dialog_id, "bye")
    finally:
        own_redis.signal(signal.SIGCONT)
    assert len(e.pending) == 3 and e.pending.dropped == 2
    assert until(ticked(e, lambda: not e.breaker.open))
    store = e.store
    assert isinstance(store, RedisStore)
    assert len(e.pending) == 0
    # 2 releases were dropped: unless Redis ran them after all (a call that timed out may
    # still have reached it), those calls still count, until their deadline
    assert store.profile_size("total") <= 2
    store.clock_offset_ms += 121_000  # past the early deadline: the next sweep ends them
    store.tick("proxy-a", 0, False)
    assert store.profile_size("total") == 0


def test_lost_node_dialogs_stop_counting_after_the_lease(redis_url: str, namespace: str) -> None:
    policy = make_policy(namespace)
    a = Engine(policy, RedisStore(redis_url, namespace, timeout_ms=2000), node="proxy-a",
               lease=True)
    b_store = RedisStore(redis_url, namespace, timeout_ms=2000)
    b = Engine(policy, b_store, node="proxy-b", lease=True)
    a.start()
    b.start()
    for i in range(4):
        assert a.admit(call("5551234", f"a{i}")).admitted
    assert b.admit(call("5551234", "b0")).admitted
    assert b_store.profile_size("total") == 5
    # proxy-a is killed: it renews no more, proxy-b renews every 5 s. 31 s later (store
    # clock), proxy-b's tick ends proxy-a's dialogs
    for _ in range(7):
        b_store.clock_offset_ms += 5_000
        b.lifecycle.renew_soon()  # the tick is due
        b.tick()
    assert b_store.profile_size("total") == 1
    assert b_store.ended().get("node_lost") == 4
    assert "proxy-a" not in b_store.nodes()
    records = b_store.call_records()
    assert sum(r.reason == "node_lost" for r in records) == 4


def test_on_node_loss_keep_leaves_dialogs_until_their_deadline(redis_url: str,
                                                               namespace: str) -> None:
    policy = make_policy(namespace, loss="keep")
    a = Engine(policy, RedisStore(redis_url, namespace, timeout_ms=2000), node="proxy-a",
               lease=True)
    b_store = RedisStore(redis_url, namespace, timeout_ms=2000)
    b = Engine(policy, b_store, node="proxy-b", lease=True)
    a.start()
    k0 = call("5551234", "k0")
    assert a.admit(k0).admitted  # early deadline: now + 120 s
    b_store.clock_offset_ms += 31_000  # proxy-a's lease (30 s) has lapsed
    b.tick()
    assert b.admit(call("5551234", "k1")).admitted  # early deadline: now + 31 s + 120 s
    assert b_store.profile_size("total") == 2  # kept: not ended as node_lost
    assert "node_lost" not in b_store.ended()
    # past k0's early deadline, not yet k1's: the tick ends k0 (it counted until then)
    b_store.clock_offset_ms += 94_000
    assert b_store.profile_size("total") == 2
    b.lifecycle.renew_soon()  # the tick is due
    b.tick()
    assert b_store.ended() == {"expired": 1}
    assert [(r.call_id, r.reason) for r in b_store.call_records()] == [(k0.call_id, "expired")]
    assert b_store.profile_size("total") == 1 and b.admit(call("5551234", "k2")).admitted


def test_a_restarted_node_ends_what_it_left_behind(redis_url: str, namespace: str) -> None:
    policy = make_policy(namespace)
    store = RedisStore(redis_url, namespace, timeout_ms=2000)
    first = Engine(policy, store, node="proxy-a", lease=True)
    for i in range(3):
        first.admit(call("5551234", f"r{i}"))
    assert store.profile_size("total") == 3
    again = Engine(policy, RedisStore(redis_url, namespace, timeout_ms=2000), node="proxy-a",
                   lease=True)
    again.start()
    assert store.profile_size("total") == 0
    assert store.ended().get("node_restarted") == 3


def test_policy_reload_swaps_a_valid_file_and_keeps_the_old_on_error(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    path = policy_copy(tmp_path, namespace)
    e = Engine(load_policy(path), RedisStore(redis_url, namespace, timeout_ms=2000),
               node="n", watch=path, watch_interval=0)  # checks the file at every tick
    for i in range(3):
        assert e.admit(call("5551234", "gina", call_id=f"g{i}")).admitted
    assert not e.admit(call("5551234", "gina")).admitted  # user max 3
    # a broken file: rejected, the old policy keeps serving
    text = path.read_text()
    path.write_text(text.replace("user: {max: 3}", "user: {max: lots}"))
    e.tick()
    d = e.admit(call("5551234", "hank"))
    assert d.admitted and e.policy.limits["user"].max == 3
    assert e._watcher.errors == 1  # type: ignore[union-attr]
    # a valid change takes effect at the next tick
    path.write_text(text.replace("user: {max: 3}", "user: {max: 5}"))
    e.tick()
    assert e.admit(call("5551234", "gina")).admitted
    assert e.policy.limits["user"].max == 5
    # removing a profile leaves no orphaned memberships
    acct = e.admit(call("5551234", "ivy", headers={"X-Account": "acme"}))
    assert "account=acme" in acct.memberships
    path.write_text(text.replace("  account: {value: account}", "")
                    .replace("  account: {max: 10, reject: {code: 486, reason: "
                             "\"Account Call Limit\"}}  # per value\n", ""))
    e.tick()
    assert e.admit(call("5551234", "jon")).admitted
    assert e.policy.profile("account") is None
    e.release(acct.dialog_id, "bye")
    assert e.store.profile_size("account", "acme") == 0
    rec = e.store.call_records()[-1]
    assert json.loads(json.dumps(rec.as_dict()))["Profiles"][-1] == "account=acme"


def test_first_calls_after_an_empty_restart_wait_for_the_counts(own_redis: RedisServer,
                                                                namespace: str) -> None:
    """The connection broke while idle and the new Redis has no library: both are
    mended inside the same call (reconnect, then FUNCTION LOAD). Its counts are empty,
    so for RECOVERY_MS no limit is decided on them (the nodes put their calls back
    meanwhile): the fallback decides, saying why; then Redis decides again."""
    e = engine_on(own_redis, namespace, on_error="reject")
    assert not e.admit(call("5551234", "before")).fallback
    own_redis.restart()
    d = e.admit(call("5551234", "after"))
    assert d.fallback and not d.admitted and "recovering" in d.error
    assert e.admit(call("112", "sos")).admitted  # emergency calls always pass
    e.store.clock_offset_ms += RECOVERY_MS  # type: ignore[attr-defined]
    e.breaker.success()
    d = e.admit(call("5551234", "later"))
    assert d.admitted and not d.fallback, d.error


def test_a_timer_process_that_only_ticks_recovers_and_applies_its_queue(
        own_redis: RedisServer, namespace: str) -> None:
    """Kamailio's timer process decides nothing: its ticks alone must close the breaker
    and apply what waited while Redis was down (answers and ends of calls)."""
    proxy = engine_on(own_redis, namespace, lease=True)
    proxy.start()
    d = proxy.admit(call("5551234", headers={"X-Account": "acme"}))
    assert d.admitted and not d.fallback
    timer = engine_on(own_redis, namespace, lease=True)
    own_redis.signal(signal.SIGSTOP)
    try:
        timer.confirm(d.dialog_id)
        timer.release(d.dialog_id, "bye")
        for _ in range(3):
            timer.tick()
            time.sleep(0.3)  # past the breaker's probe interval
        assert timer.breaker.open and len(timer.pending) == 2
    finally:
        own_redis.signal(signal.SIGCONT)
    assert until(ticked(timer, lambda: not timer.breaker.open and not timer.pending))
    store = timer.store
    assert store.profile_size("total") == 0
    assert store.ended() == {"bye": 1}


def test_a_caller_packing_another_policys_attributes_is_refused_not_misread(
        redis_url: str, namespace: str) -> None:
    """A proxy generated for one policy while another (reading other attributes) is
    loaded must fall back, not have its attributes read as the other policy's."""
    loaded = make_policy(namespace)
    other = make_policy(namespace, on_error="reject", queue=10, loss="keep",
                        attributes={"account": "from_user"})
    proxy = Engine(loaded, RedisStore(redis_url, namespace, timeout_ms=2000), node="a")
    proxy.start()
    stale = Engine(other, RedisStore(redis_url, namespace, timeout_ms=2000), node="b")
    d = stale.admit(call("5551234", "alice", headers={"X-Account": "acme"}))
    assert d.fallback and not d.admitted
    assert "another policy" in d.error and "policer load" in d.error
    assert proxy.store.profile_size("total") == 0
    assert proxy.admit(call("5551234", headers={"X-Account": "acme"})).admitted


def test_after_redis_restarted_empty_a_tick_loads_the_library_and_renews_the_lease(
        own_redis: RedisServer, namespace: str) -> None:
    proxy = engine_on(own_redis, namespace, lease=True)
    proxy.start()
    store = proxy.store
    assert store.nodes() != {}
    own_redis.restart()  # empty: no library, no lease, no registration
    proxy.tick()
    assert until(ticked(proxy, lambda: store.loaded_hash() is not None))
    # the lease is back at once, not a renew interval (5 s) later
    assert "proxy-a" in store.nodes()
