"""A count is a live call after any fault (issue 15), with real redis-server processes:
a paused Redis leaves no ghost call, an answer that came too late is settled, a Redis
that lost its state gets every node's live calls back with no command run, a node
whose clock is off still has its calls decided, and a node name has one live owner."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lab.netfault import Relay
from lab.redis_server import RedisServer, free_port
from policer.call import Call
from policer.compile import RECOVERY_MS
from policer.engine import Engine, NodeInUse
from policer.metrics import ClusterCollector
from policer.policy import Policy
from policer.reconcile import ProxyDialog
from policer.store import Op, RedisStore, StoreError
from policer.store.keys import dialog_id
from tests.support import call, ticked, wait_for
from tests.support.policies import ACCOUNT, EMERGENCY_112, build_policy


def make_policy(ns: str, on_error: str = "reject", lease: str = "30s",
                total: int = 20) -> Policy:
    return build_policy(ns, attributes=ACCOUNT, classes=EMERGENCY_112,
                        profiles={"total": {}, "account": "account"},
                        limits={"total": total, "account": 4}, on_store_error=on_error,
                        store_timeout="50ms", timeouts={"early": "120s"},
                        nodes={"lease": lease, "renew": "1s"})


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


class Proxy:
    """A proxy node as Kamailio's timer process runs it: an engine holding a lease, and
    the list of calls it carries (what ``dlg.list`` gives)."""

    def __init__(self, server: RedisServer, ns: str, node: str = "proxy-a",
                 url: str = "", on_error: str = "reject", lease: str = "30s") -> None:
        policy = make_policy(ns, on_error, lease)
        self.store = RedisStore(url or server.url, ns, timeout_ms=policy.store_timeout_ms)
        self.engine = Engine(policy, self.store, node=node, lease=True)
        self.calls: dict[str, Call] = {}
        self.engine.dialog_source = lambda: [ProxyDialog(c, False, True)
                                             for c in list(self.calls.values())]

    def place(self, c: Call) -> bool:
        d = self.engine.admit(c)
        if d.admitted:
            self.calls[d.dialog_id] = c
        return d.admitted

    def hang_up(self, did: str) -> None:
        self.calls.pop(did, None)
        self.engine.release(did, "bye")

    def counted(self) -> int:
        return self.store.profile_size("total")


def acme(user: str, number: str = "5551234") -> Call:
    return call(number, user, headers={"X-Account": "acme"})


def test_a_paused_redis_leaves_no_ghost_call(own_redis: RedisServer, namespace: str) -> None:
    """Redis frozen: the proxy's admits time out and its fallback rejects them, yet the
    requests sit in Redis's socket; when Redis resumes they are applied late, so they
    write nothing. Every count equals the calls that are up."""
    p = Proxy(own_redis, namespace)
    p.engine.start()
    up = [acme(f"up{i}") for i in range(2)]
    assert all(p.place(c) for c in up)
    own_redis.signal(signal.SIGSTOP)
    try:
        stalled = [acme(f"s{i}") for i in range(3)]
        decisions = [p.engine.admit(c) for c in stalled]
        assert all(d.fallback and not d.admitted for d in decisions)
        time.sleep(0.3)  # well past every request's deadline
    finally:
        own_redis.signal(signal.SIGCONT)
    p.engine.breaker.success()
    assert wait_for(ticked(p.engine, lambda: not p.engine.pending), 10)
    assert p.counted() == 2 and p.store.profile_size("account", "acme") == 2
    assert p.store.stats()["active"] == 2
    for c in stalled:
        assert p.store.dialog(dialog_id(c.call_id, c.from_tag)) is None
    # the caller's INVITE sent again after the stall is decided normally
    assert p.place(stalled[0]) and p.counted() == 3


def test_an_answer_that_came_too_late_is_settled(own_redis: RedisServer, namespace: str
                                                 ) -> None:
    """Redis decided within the deadline but the answer reached the proxy after it gave
    up (another client's slow command stalled the reply): the fallback rejected the call
    and queued the settlement; applied, it undoes the admission."""
    p = Proxy(own_redis, namespace)
    p.engine.start()
    c = acme("slow")
    deadline = p.store.deadline_ms(5_000)
    assert p.store.admit_call(c, "proxy-a", deadline_ms=deadline).admitted  # applied ...
    timed_out = StoreError("TimeoutError: Timeout reading from socket")
    timed_out.maybe_applied = True
    d = p.engine.admit_failed(c, timed_out, time.perf_counter(), deadline)  # ... too late
    assert d.fallback and not d.admitted
    assert p.counted() == 1 and len(p.engine.pending) == 1
    p.engine.tick()
    assert p.counted() == 0 and not p.engine.pending
    assert p.store.call_records() == []


def test_a_call_the_fallback_admitted_is_counted_once(own_redis: RedisServer, namespace: str
                                                      ) -> None:
    p = Proxy(own_redis, namespace, on_error="admit")
    p.engine.start()
    own_redis.signal(signal.SIGSTOP)
    try:
        c = acme("open")
        assert p.place(c)
        time.sleep(0.2)
    finally:
        own_redis.signal(signal.SIGCONT)
    p.engine.breaker.success()
    assert wait_for(ticked(p.engine, lambda: not p.engine.pending), 10)
    assert p.counted() == 1 and p.store.stats()["recorded"] == 1


def test_redis_restarted_empty_gets_the_live_calls_back(own_redis: RedisServer,
                                                        namespace: str) -> None:
    """No command run by anyone: the nodes' ticks notice the loss, load the library,
    hold admits while they put their calls back, then decide on whole counts."""
    a = Proxy(own_redis, namespace, node="proxy-a")
    b = Proxy(own_redis, namespace, node="proxy-b")
    a.engine.start()
    b.engine.start()
    assert all(a.place(acme(f"a{i}")) for i in range(3))
    assert b.place(acme("b0"))
    assert a.counted() == 4
    own_redis.restart()  # empty
    t0 = time.monotonic()

    def restored() -> bool:
        a.engine.tick()
        b.engine.tick()
        return a.counted() == 4 and a.store.profile_size("account", "acme") == 4

    assert wait_for(restored, 10)
    took = time.monotonic() - t0
    assert took < 5, f"restored after {took:.1f} s"
    # while the counts were being restored no limit was decided on them
    held = a.engine.admit(acme("during"))
    if held.fallback:
        assert "recovering" in held.error
    a.store.clock_offset_ms = b.store.clock_offset_ms = RECOVERY_MS
    a.engine.breaker.success()
    # the account holds 4 calls again: the limit holds
    after = a.engine.admit(acme("after"))
    assert not after.fallback and not after.admitted and after.limit == "account"
    assert a.store.stats()["active"] == 4


def test_redis_restarted_from_its_aof_is_checked_against_the_nodes(
        namespace: str) -> None:
    """A restart from the AOF (appendfsync everysec may lose the last second) or a
    failover answers with another server: the nodes put their calls back and end what
    they no longer carry."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        p = Proxy(server, namespace)
        p.engine.start()
        calls = [acme(f"c{i}") for i in range(3)]
        assert all(p.place(c) for c in calls)
        p.engine.tick()
        gone = dialog_id(calls[0].call_id, calls[0].from_tag)
        p.calls.pop(gone)  # ended while its release was lost (a failover's lost write)
        p.store.clock_offset_ms = 2_000  # the calls are older than a resync's margin
        server.restart()  # from the AOF: the library and every call are back
        assert wait_for(ticked(p.engine, lambda: p.counted() == 2), 10)
        info = p.store.dialog(gone)
        assert info is not None and info.state == "ended"
    finally:
        server.stop()


def test_the_counts_hash_stays_a_hashtable_after_a_restart_or_a_loss(
        namespace: str) -> None:
    """Redis keeps a small hash (up to 512 fields as it is built) as a listpack, which
    every HMGET and HSET of the admit searches field by field: a namespace of a few
    hundred values paid half as much again per admit. The counts hash holds a value too
    long for a listpack, from the first tick, through a restart from an RDB base (which
    makes small hashes listpacks again) and after its state was lost."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        p = Proxy(server, namespace)
        p.engine.start()
        assert all(p.place(acme(f"c{i}")) for i in range(3))
        client, counts = p.store.client, p.store.keys.counts

        def encoding() -> str:
            return str(client.object("encoding", counts))

        assert encoding() == "hashtable"
        client.bgrewriteaof()  # the AOF's base: an RDB file
        assert wait_for(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0
                        and client.info("persistence")["aof_rewrite_scheduled"] == 0, 10)
        server.restart()
        assert wait_for(ticked(p.engine, lambda: p.counted() == 3), 10)
        assert encoding() == "hashtable"
        client.flushall()  # the state lost: the node puts its calls back
        assert wait_for(ticked(p.engine, lambda: p.counted() == 3), 10)
        assert encoding() == "hashtable"
        assert p.store.profile_size("account", "acme") == 3
    finally:
        server.stop()


def test_a_node_cut_off_longer_than_its_lease_puts_its_calls_back(
        own_redis: RedisServer, namespace: str) -> None:
    a = Proxy(own_redis, namespace, node="proxy-a", lease="2s")
    b = Proxy(own_redis, namespace, node="proxy-b", lease="2s")
    a.engine.start()
    b.engine.start()
    assert all(a.place(acme(f"a{i}")) for i in range(2))
    # a stops ticking (cut off); b's ticks end its calls when its lease lapses
    assert wait_for(ticked(b.engine, lambda: a.counted() == 0), 10)
    # a comes back: its renewal finds its lease had lapsed, it puts its calls back
    a.engine.tick()
    assert a.counted() == 2


@pytest.mark.parametrize("skew_s", [5.0, -5.0])
def test_a_node_whose_clock_is_off_has_its_calls_decided(
        own_redis: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch,
        skew_s: float) -> None:
    """The deadlines a node sends are in Redis's clock, corrected by the skew the node
    measures; the skew is kept in Redis for the exporter and policer stats."""
    real = time.time
    monkeypatch.setattr("policer.store.redis_store.time.time", lambda: real() + skew_s)
    p = Proxy(own_redis, namespace)
    p.engine.start()
    assert abs(p.store.clock_skew_ms - skew_s * 1000) < 100
    decisions = [p.engine.admit(acme(f"u{i}")) for i in range(4)]
    assert all(d.admitted and not d.fallback for d in decisions), decisions[0].error
    p.engine.tick()
    p.engine.lifecycle.renew_soon()  # renew now (writes the skew)
    p.engine.tick()
    skews = p.store.node_skews()
    assert abs(skews["proxy-a"][0] - skew_s * 1000) < 100
    # what the exporter shows (cluster-wide, from Redis)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(p.engine.policy, p.store))
    shown = registry.get_sample_value("policer_node_clock_skew_seconds", {"node": "proxy-a"})
    assert shown is not None and abs(shown - skew_s) < 0.1


def test_a_second_instance_with_the_same_node_name_refuses_to_start(
        own_redis: RedisServer, namespace: str) -> None:
    a = Proxy(own_redis, namespace)
    a.engine.start()
    assert a.place(acme("a"))
    stop = threading.Event()

    def renew() -> None:  # a is alive: its timer ticks
        while not stop.wait(0.2):
            a.engine.lifecycle.renew_soon()
            a.engine.tick()

    t = threading.Thread(target=renew, daemon=True)
    t.start()
    try:
        b = Proxy(own_redis, namespace)
        with pytest.raises(NodeInUse, match="POLICER_NODE"):
            b.engine.start()
        assert a.counted() == 1  # a's calls were not ended
    finally:
        stop.set()
        t.join()
    # a crashed (it renews no more): a restart takes over within one renew interval
    c = Proxy(own_redis, namespace)
    t0 = time.monotonic()
    c.engine.start()
    assert time.monotonic() - t0 < 1 + 1.5 + 1
    assert a.counted() == 0  # a's calls ended (node_restarted)


def test_the_void_op_packs_and_applies_through_the_batch_format(
        own_redis: RedisServer, namespace: str) -> None:
    p = Proxy(own_redis, namespace)
    c = acme("x")
    deadline = p.store.deadline_ms()
    packed = p.store.pack_ops([Op("void", dialog_id(c.call_id, c.from_tag), deadline)])
    assert packed.startswith(b"X")
    assert p.store.apply_packed(packed) == 1
    with pytest.raises(StoreError, match="late"):
        p.store.admit_call(c, "proxy-a", deadline_ms=deadline)


def _held(store: RedisStore) -> bool:
    """Admits are held (a new state epoch after a loss): P c's '!hold' is set."""
    return store.client.hget(store.keys.counts, "!hold") is not None


def _all_at_once(proxies: list[Proxy], act: Callable[[Proxy], object]) -> None:
    """``act`` on every proxy at the same moment (a thread each, behind a barrier), then
    a tick of each."""
    barrier = threading.Barrier(len(proxies))

    def run(p: Proxy) -> None:
        barrier.wait()
        act(p)

    threads = [threading.Thread(target=run, args=(p,)) for p in proxies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in proxies:
        p.engine.tick()


def test_nodes_starting_together_on_a_fresh_namespace_hold_no_admit(
        own_redis: RedisServer, namespace: str) -> None:
    """Proxies started at the same moment each load the library: none takes another's
    load for a Redis that lost its state, so none holds admits (a hold sends every
    INVITE to the fallback for seconds)."""
    proxies = [Proxy(own_redis, namespace, node=f"proxy-{i}") for i in range(6)]
    for round_ in range(3):  # a restart of them all, on the namespace they left
        _all_at_once(proxies, lambda p: p.engine.start())
        assert not _held(proxies[0].store)
        for i, p in enumerate(proxies):
            d = p.engine.admit(acme(f"s{round_}-{i}"))
            assert not d.fallback, d.error


def test_reloads_racing_each_other_hold_no_admit(own_redis: RedisServer,
                                                 namespace: str) -> None:
    """Every node's policy file changed at once: each loads the new library, each load
    resets the library's Lua memory under the others' feet; none is taken for a lost
    state."""
    proxies = [Proxy(own_redis, namespace, node=f"proxy-{i}") for i in range(6)]
    for p in proxies:
        p.engine.start()
    for round_ in range(4):
        policy = make_policy(namespace, total=21 + round_)

        def load(p: Proxy, policy: Policy = policy) -> None:
            p.store.load(policy)

        _all_at_once(proxies, load)
        assert not _held(proxies[0].store)
        assert not proxies[0].engine.admit(acme(f"r{round_}")).fallback


def test_a_link_slower_than_store_timeout_keeps_the_lease(
        own_redis: RedisServer, namespace: str, tmp_path: Path) -> None:
    """One node's link to Redis 150 ms slow, for longer than its lease: its admits
    (store_timeout 50 ms) go to the fallback, but its periodic calls wait longer, so
    its lease does not lapse: its calls stay counted, the other node does not end them
    as a lost node's, and no slot they hold is given to another call (they would be put
    back over the max when the link recovers)."""
    relay = Relay(("127.0.0.1", free_port()), ("127.0.0.1", own_redis.port), tmp_path)
    relay.start()
    try:
        a = Proxy(own_redis, namespace, node="proxy-a", lease="2s",
                  url=f"redis://127.0.0.1:{relay.listen[1]}/0")
        b = Proxy(own_redis, namespace, node="proxy-b", lease="2s")
        a.engine.start()
        b.engine.start()
        up = [acme(f"up{i}") for i in range(4)]
        assert all(a.place(c) for c in up)
        relay.set_delay(150)
        for _ in range(4):  # 3.6 s of script time, each node due to renew every 0.9 s
            for p in (a, b):
                p.store.clock_offset_ms += 900
                p.engine.lifecycle.renew_soon()
                p.engine.tick()
        assert a.engine.admit(acme("slow")).fallback  # an admit times out
        relay.set_delay(0)
        a.engine.breaker.success()
        b.engine.lifecycle.renew_soon()
        b.engine.tick()  # a sweep: a lapsed lease would end a's calls now
        for c in up:
            info = b.store.dialog(dialog_id(c.call_id, c.from_tag))
            assert info is not None and info.state != "ended", info
        assert b.counted() == 4 and b.store.profile_size("account", "acme") == 4
        # the account is full: its limit still holds
        d = b.engine.admit(acme("over"))
        assert not d.fallback and not d.admitted and d.limit == "account"
    finally:
        relay.stop()
