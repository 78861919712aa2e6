"""The fraud guard on Redis against the in-process model (``policer.store.fraud``):
random calls of two users to local and international numbers, retransmissions, short
answered calls, lifted blocks and time jumps, decided by both stores side by side. After
every step both decide the same, hold the same statistics for every rule and value,
have reported the same events and stand the same blocks; every profile equals the
calls up.

The library remembers, per state (an entry the plans counting in it share), the fraud
state it last wrote, the number it last counted and the numbers the state lists (its
short and fast ways); this test is where that memory meeting a state written by
another entry (a plan of a class the rule does not count), shared by plans (the two
classes of one user, the two users of one account), written by a call's end (short
calls), by a lift, by a retransmission (of the same or of another number) or by a new
window would show as a difference from the model. The
second policy's levels are high enough for the fast way to run most calls, and its
sweeps take a user past the 32 numbers a state lists into the sketch.

Time moves only through the stores' ``clock_offset_ms``: the run starts half a minute
into an hour and jumps whole minutes, so that no call lands on a window's or a block's
end, where the two stores' clocks (a few ms apart) could see different sides.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policer.call import Call
from policer.engine import Decision, Engine
from policer.store import MemoryStore, RedisStore, Store
from tests.support import STORE_TIMEOUT_MS, call, new_namespace, policy_text
from tests.support.policies import ACCOUNT, policy_yaml

HOUR = 3_600_000
MINUTE = 60_000

#: two users' calls, local or international, and four rules over them (three sharing one
#: state: the same key and window, every class), and one over the account both users
#: call from (its state written by both users' plans; a shadow, so that it blocks none)
POLICY = policy_yaml("model", version=2, attributes=ACCOUNT, classes={
    "international": {"prefixes": ["00"]}, "local": {"default": True}},
    profiles={"total": {}, "user": "from_user"}, limits={"total": 100, "user": 50}) + """
fraud:
  - name: busy
    key: user
    per: 1h
    calls: {warning: 4, critical: 9}
    sequential: {warning: 2, critical: 4}
    action: {block: 10m, reject: {code: 403, reason: "Fraud Suspected"}}
  - name: redial-watch
    key: user
    per: 1h
    sequential: {critical: 3}
    shadow: true
  - name: intl-sweep
    key: user
    when: {class: international}
    per: 1h
    distinct_numbers: {warning: 2, critical: 3}
    action: {block: 20m}
  - name: wangiri
    key: user
    per: 1h
    short_calls: {under: 6s, warning: 1, critical: 2}
    action: {block: 5m, reject: {code: 486, reason: "Busy Here"}}
  - name: team
    key: account
    when: {class: international}
    per: 1h
    calls: {warning: 5, critical: 8}
    distinct_numbers: {warning: 3, critical: 4}
    sequential: {warning: 3}
    shadow: true
"""
RULES = ("busy", "redial-watch", "intl-sweep", "wangiri", "team")
TEAM = {"X-Account": "acme"}
USERS = ("ann", "ben")
NUMBERS = ("5550001", "5550002", "00442070001", "00442070002", "00442070003")

#: the same rules, levels that the fast way runs under for most calls; distinct numbers
#: past the 32 a state lists
FAST_POLICY = POLICY.replace("calls: {warning: 4, critical: 9}",
                             "calls: {warning: 30, critical: 60}").replace(
    "sequential: {warning: 2, critical: 4}", "sequential: {warning: 6, critical: 9}").replace(
    "sequential: {critical: 3}", "sequential: {critical: 7}").replace(
    "distinct_numbers: {warning: 2, critical: 3}",
    "distinct_numbers: {warning: 34, critical: 38}").replace(
    "calls: {warning: 5, critical: 8}", "calls: {warning: 70, critical: 90}").replace(
    "distinct_numbers: {warning: 3, critical: 4}",
    "distinct_numbers: {warning: 36, critical: 39}").replace(
    "sequential: {warning: 3}", "sequential: {warning: 8}")
#: international numbers of which none leaves the sketch unchanged once all the others
#: are in it (so a HyperLogLog counts every new one, as the model does): found once
SWEEP_POOL = 40

#: one step: ("call", user, number, sent again: "again" the same, "other" the same
#: Call-ID to another number), ("short", user, number) an answered call that ends after
#: 2 s, ("end",) the oldest call up ends, ("lift", user), ("jump", minutes); and with the
#: second policy ("sweep", user, first, n): calls to n numbers of the pool from the first
#: on, and ("reload",): Redis loads the library again, its plans (and all they remember)
#: gone, as after an upgrade
STEP = st.one_of(
    st.tuples(st.just("call"), st.sampled_from(USERS), st.sampled_from(NUMBERS),
              st.sampled_from(["", "again", "other"])),
    st.tuples(st.just("short"), st.sampled_from(USERS), st.sampled_from(NUMBERS)),
    st.tuples(st.just("end")),
    st.tuples(st.just("lift"), st.sampled_from(USERS)),
    st.tuples(st.just("jump"), st.sampled_from([1, 7, 41])),
)
FAST_STEP = st.one_of(
    STEP,
    st.tuples(st.just("sweep"), st.sampled_from(USERS), st.integers(0, SWEEP_POOL - 1),
              st.integers(1, 12)),
    st.tuples(st.just("reload")),
)


@pytest.fixture(scope="module")
def url(redis_url: str) -> str:
    return redis_url


@pytest.fixture(scope="module")
def pool(redis_url: str) -> list[str]:
    """SWEEP_POOL international numbers, each of which changes a HyperLogLog holding all
    the others (then it changes one holding any of them: a sketch of fewer numbers has
    no register higher)."""
    r = redis.Redis.from_url(redis_url)
    candidates = [f"004930{j:06d}" for j in range(SWEEP_POOL * 2)]
    out: list[str] = []
    for n in candidates:
        key = f"model-pool:{new_namespace()}"
        r.pfadd(key, *out)
        if r.pfadd(key, n):
            out.append(n)
        r.delete(key)
        if len(out) == SWEEP_POOL:
            break
    for n in out:  # and none is masked by one found after it
        key = f"model-pool:{new_namespace()}"
        r.pfadd(key, *(m for m in out if m != n))
        assert r.pfadd(key, n) == 1, n
        r.delete(key)
    r.close()
    return out


class Pair:
    """The same policy on both stores, their clocks moved together."""

    def __init__(self, redis_url: str, text: str = POLICY) -> None:
        ns = new_namespace()
        self.policy = policy = policy_text(text, ns)
        self.redis = RedisStore(redis_url, ns, timeout_ms=STORE_TIMEOUT_MS, policy=policy)
        self.model = MemoryStore(ns)
        self.stores: tuple[Store, Store] = (self.redis, self.model)
        self.engines = [Engine(policy, s, node="model-node") for s in self.stores]
        for s in self.stores:
            s.load(policy)
        now = self.model.now_ms()
        self.jump(HOUR - now % HOUR + 30_000)
        self.up: list[tuple[str, ...]] = []  # dialog ids up, on both stores alike

    def jump(self, ms: int) -> None:
        for s in self.stores:
            s.clock_offset_ms += ms  # type: ignore[attr-defined]

    def admit(self, c: Call) -> tuple[Decision, Decision]:
        got = tuple(e.admit(c) for e in self.engines)
        assert len(got) == 2
        return got[0], got[1]

    def close(self) -> None:
        self.redis.close()


@pytest.fixture
def pairs(url: str) -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for p in made:
        p.close()


def outcome(d: Decision) -> tuple[object, ...]:
    return (d.admitted, d.code, d.reason, d.limit, d.kind, d.duplicate)


def same_fraud_state(p: Pair) -> None:
    for rule in RULES:
        states = [{v: (s.window, s.calls, s.distinct, s.sequential, s.short, s.levels, s.last)
                   for v, s in store.fraud_states(rule).items()} for store in p.stores]
        assert states[0] == states[1], rule
    events = [[(e.rule, e.level, e.value, e.stat, e.count, e.threshold, e.action)
               for e in store.fraud_events(1000)] for store in p.stores]
    assert events[0] == events[1]
    blocks = [sorted((b.rule, b.value) for b in store.fraud_blocks()) for store in p.stores]
    assert blocks[0] == blocks[1]


def counts_match(p: Pair) -> None:
    for store in p.stores:
        assert store.profile_size("total") == len(p.up)
        for user in USERS:
            assert store.profile_size("user", user) == sum(1 for u in p.up if u[1] == user)


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=30))
def test_the_fraud_guard_on_redis_follows_the_model(pairs: list[Pair], url: str,
                                                     steps: list[tuple[object, ...]]) -> None:
    p = Pair(url)
    pairs.append(p)
    run(p, steps, [])


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(FAST_STEP, min_size=1, max_size=60))
def test_the_fast_way_and_the_sketch_follow_the_model(pairs: list[Pair], url: str,
                                                      pool: list[str],
                                                      steps: list[tuple[object, ...]]) -> None:
    p = Pair(url, FAST_POLICY)
    pairs.append(p)
    run(p, steps, pool)


def run(p: Pair, steps: list[tuple[object, ...]], pool: list[str]) -> None:
    """The steps on both stores, compared after each."""
    for step in steps:
        kind = step[0]
        if kind == "call":
            _, user, number, again = step
            c = call(str(number), str(user), headers=TEAM)
            a, b = p.admit(c)
            assert outcome(a) == outcome(b), step
            if a.admitted:
                p.up.append((a.dialog_id, str(user)))
            if again:
                other = NUMBERS[(NUMBERS.index(str(number)) + 1) % len(NUMBERS)]
                c2 = c if again == "again" else call(other, str(user), call_id=c.call_id,
                                                     headers=TEAM)
                a2, b2 = p.admit(c2)
                assert outcome(a2) == outcome(b2) and a2.duplicate, step
        elif kind == "sweep":
            _, user, first, n = step
            for number in (pool * 2)[int(str(first)):int(str(first)) + int(str(n))]:
                a, b = p.admit(call(number, str(user), headers=TEAM))
                assert outcome(a) == outcome(b), step
                if a.admitted:
                    for e in p.engines:
                        e.release(a.dialog_id)
        elif kind == "short":
            _, user, number = step
            a, b = p.admit(call(str(number), str(user), headers=TEAM))
            assert outcome(a) == outcome(b), step
            if a.admitted:
                for e in p.engines:
                    assert e.confirm(a.dialog_id)
                p.jump(2_000)
                for e in p.engines:
                    e.release(a.dialog_id)
                p.jump(-2_000)
        elif kind == "end" and p.up:
            did, _ = p.up.pop(0)
            for e in p.engines:
                e.release(did)
        elif kind == "lift":
            lifted = [sorted(s.fraud_lift(list(RULES), str(step[1]))) for s in p.stores]
            assert lifted[0] == lifted[1], step
        elif kind == "jump":
            p.jump(int(str(step[1])) * MINUTE)
        elif kind == "reload":
            p.redis.client.function_flush()
            p.redis.load(p.policy)
        same_fraud_state(p)
        counts_match(p)
    for did, _ in p.up:
        for e in p.engines:
            e.release(did)
    p.up.clear()
    counts_match(p)
