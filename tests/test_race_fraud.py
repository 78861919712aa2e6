"""16 processes at once against the fraud guard (issue 19), through the engine and one
Redis: every process calls the same six users, in the same order (lockstep) or each
round in an order of its own (shuffled), so that many of them cross the same level of
the same value together. No crossing is missed and none is reported twice: exactly one
event per rule, value, statistic and level reached in the window, at the level's count
itself; the call that reaches critical is refused and not one call of the value is
admitted after it; the counters, the states and the blocks agree with the stream;
every count returns to 0 once the calls are released.

Three kinds of users, two of each, so that exactly one rule can refuse a user's calls
first and the calls admitted are known in advance:

* volume users dial one number and hang up at once: the 40th call (``calls``) is the
  first refused, 39 are admitted;
* sweep users dial a new number each call: the 30th distinct number
  (``distinct_numbers``) is the first refused, 29 are admitted;
* parallel users (an account) dial one number and hold their calls: the 10th live call
  (``concurrent``) is the first refused, 9 are admitted; the 40th call (``calls``) then
  blocks them by that rule too.

A shadow rule watches ``sequential`` and ``short_calls`` (every answered call is short):
it reports and never refuses. Every user's calls go on after the block and still count.

Which call of a user was decided when is read from the attempts stream (one entry per
decided call, in the order Redis ran them), never from clocks.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from policer.engine import Engine
from policer.store import RedisStore
from policer.store.base import Attempt
from policer.store.fraud import FraudEvent
from tests.support import STORE_TIMEOUT_MS, call, new_namespace, with_namespace
from tests.support.policies import ACCOUNT, build_policy
from tests.support.race import PROCESSES, run_workers

HOUR = 3_600_000
#: calls each worker makes to each user: every user gets PROCESSES * ROUNDS calls
ROUNDS = 12
CALLS = PROCESSES * ROUNDS

VOLUME = ("v0", "v1")
SWEEP = ("s0", "s1")
PARALLEL = ("p0", "p1")
USERS = (*VOLUME, *SWEEP, *PARALLEL)
ONE_NUMBER = "5551234"

CALLS_LEVELS = {"warning": 20, "critical": 40}
DISTINCT_LEVELS = {"warning": 10, "critical": 30}
CONCURRENT_LEVELS = {"warning": 5, "critical": 10}
SEQUENTIAL_LEVELS = {"warning": 10, "critical": 25}
SHORT_LEVELS = {"warning": 5, "critical": 15}

POLICY = build_policy(
    "race-fraud", version=2, attributes=ACCOUNT,
    profiles={"total": {}, "user": "from_user", "account": "account"},
    fraud=[
        {"name": "volume", "key": "user", "per": "1h",
         "calls": CALLS_LEVELS, "distinct_numbers": DISTINCT_LEVELS},
        {"name": "parallel", "key": "account", "per": "1d",
         "concurrent": CONCURRENT_LEVELS,
         "action": {"reject": {"code": 486, "reason": "Busy Here"}}},
        # every answered call is short (under the longest 'under' there is)
        {"name": "watch", "key": "user", "per": "1h", "shadow": True,
         "sequential": SEQUENTIAL_LEVELS,
         "short_calls": {"under": "1h", **SHORT_LEVELS}},
    ])
RULES = {r.name: r for r in POLICY.fraud}
CODES = {"volume": 403, "parallel": 486}

#: the calls admitted per user: those before the first critical level of a rule that
#: refuses (calls, distinct numbers, live calls)
ADMITTED = {**dict.fromkeys(VOLUME, CALLS_LEVELS["critical"] - 1),
            **dict.fromkeys(SWEEP, DISTINCT_LEVELS["critical"] - 1),
            **dict.fromkeys(PARALLEL, CONCURRENT_LEVELS["critical"] - 1)}


def _order(user: str) -> list[str]:
    """A user's decisions in the order Redis made them: 'admitted' or the refusing rule."""
    first = ADMITTED[user]
    out = ["admitted"] * first
    if user in PARALLEL:  # blocked by its live calls until the 40th call blocks it
        out += ["parallel"] * (CALLS_LEVELS["critical"] - 1 - first)
    return out + ["volume"] * (CALLS - len(out))


#: per user, the (rule, statistic) pairs it reaches both levels of (an event each)
EXPECTED_EVENTS = {
    **{u: {("volume", "calls"), ("watch", "sequential"), ("watch", "short_calls")}
       for u in VOLUME},
    **{u: {("volume", "calls"), ("volume", "distinct_numbers"), ("watch", "short_calls")}
       for u in SWEEP},
    **{u: {("volume", "calls"), ("parallel", "concurrent"), ("watch", "sequential")}
       for u in PARALLEL},
}


@dataclass
class Seen:
    """One call as a worker saw it."""

    user: str
    dialog_id: str
    admitted: bool
    code: int
    limit: str | None
    kind: str | None
    fallback: bool


@dataclass
class Result:
    seen: list[Seen] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # admitted calls still up (parallel)
    failed: int = 0  # a confirm or a release that did not take


def _store(url: str, namespace: str, offset: int) -> RedisStore:
    return RedisStore(url, namespace, STORE_TIMEOUT_MS, clock_offset_ms=offset)


def _number(user: str, worker: int, i: int, numbers: dict[str, list[str]]) -> str:
    return numbers[user][worker * ROUNDS + i] if user in SWEEP else ONE_NUMBER


def _worker(offset: int, numbers: dict[str, list[str]], shuffled: bool, url: str,
            namespace: str, worker: int, rounds: int, barrier: Any, out: Any) -> None:
    """Each round one call to every user: in the same order as every other worker (in
    lockstep), or each round in an order of the worker's own (shuffled). A volume or
    sweep user's admitted call is answered and hung up at once (a short call), a
    parallel user's is held (unanswered) until the test releases it."""
    engine = Engine(with_namespace(POLICY, namespace), _store(url, namespace, offset),
                    node="race")
    res = Result()
    users = list(USERS)
    rng = random.Random(worker)
    barrier.wait()
    for i in range(rounds):
        if shuffled:
            rng.shuffle(users)
        for user in users:
            headers = {"X-Account": user} if user in PARALLEL else None
            d = engine.admit(call(_number(user, worker, i, numbers), user,
                                  call_id=f"fr-{worker}-{i}-{user}@race", headers=headers))
            res.seen.append(Seen(user, d.dialog_id, d.admitted, d.code, d.limit, d.kind,
                                 d.fallback))
            if not d.admitted:
                continue
            if user in PARALLEL:
                res.held.append(d.dialog_id)
            elif not engine.confirm(d.dialog_id) or engine.release(d.dialog_id) is None:
                res.failed += 1
    out.put(res)


def _start_of_hour(store: RedisStore) -> int:
    """Move the store's clock one minute into the next hour, so that the 1h and 1d
    windows cannot roll over during the race; the offset (every worker uses it)."""
    store.clock_offset_ms += HOUR - store.now_ms() % HOUR + 60_000
    return store.clock_offset_ms


def _distinct_numbers(url: str, namespace: str) -> dict[str, list[str]]:
    """CALLS numbers per sweep user of which the distinct-number sketch (a HyperLogLog:
    a number is counted, up to 64, when adding it changes the sketch) counts each new
    one, whatever their order: no two share a register. Two of a register are found by
    adding the candidates in both orders: the one that comes second changes nothing in
    one of them."""
    r = redis.Redis.from_url(url)
    out: dict[str, list[str]] = {}
    for k, user in enumerate(SWEEP):
        candidates = [f"00{k + 1}{j:08d}" for j in range(CALLS + CALLS // 4)]
        fwd, rev = f"race-hll:{namespace}:f", f"race-hll:{namespace}:r"
        pipe = r.pipeline(transaction=False)
        for n in candidates:
            pipe.pfadd(fwd, n)
        for n in reversed(candidates):
            pipe.pfadd(rev, n)
        pipe.delete(fwd, rev)
        got = pipe.execute()
        new_fwd = got[:len(candidates)]
        new_rev = list(reversed(got[len(candidates):2 * len(candidates)]))
        ok = [n for n, a, b in zip(candidates, new_fwd, new_rev, strict=True) if a and b]
        assert len(ok) >= CALLS
        out[user] = ok[:CALLS]
    r.close()
    return out


def _attempts(store: RedisStore) -> list[Attempt]:
    """Every decided attempt, in the order Redis decided them."""
    out: list[Attempt] = []
    after = ""
    while True:
        page = store.attempts(count=1000, after=after)
        if not page:
            return out
        out += page
        after = page[-1].record_id


def _levels_bits(events: list[FraudEvent]) -> int:
    """A state's ``levels``: a bit per statistic and level reported (fraud.lua)."""
    stats = ("calls", "distinct_numbers", "sequential", "concurrent", "short_calls")
    return sum(4 ** stats.index(e.stat) * (1 if e.level == "warning" else 2)
               for e in events)


@pytest.mark.parametrize("shuffled", [False, True], ids=["lockstep", "shuffled"])
def test_sixteen_processes_cross_each_level_exactly_once(redis_url: str,
                                                         shuffled: bool) -> None:
    ns = new_namespace()
    store = _store(redis_url, ns, 0)
    store.load(with_namespace(POLICY, ns))
    offset = _start_of_hour(store)
    numbers = _distinct_numbers(redis_url, ns)
    worker = functools.partial(_worker, offset, numbers, shuffled)
    results: list[Result] = run_workers(worker, redis_url, ns, ROUNDS)
    seen = [s for r in results for s in r.seen]
    held = [did for r in results for did in r.held]
    assert sum(r.failed for r in results) == 0
    assert not any(s.fallback for s in seen)
    assert len(seen) == len(USERS) * CALLS
    user_of = {s.dialog_id: s.user for s in seen}
    assert len(user_of) == len(seen)

    # -- what the workers saw: per user, the calls before the first critical crossing
    # admitted, every other one refused by the rule that blocks it, with its answer
    for user in USERS:
        mine = [s for s in seen if s.user == user]
        assert sum(s.admitted for s in mine) == ADMITTED[user], user
        refused = Counter((s.limit, s.code, s.kind) for s in mine if not s.admitted)
        want = Counter(x for x in _order(user) if x != "admitted")
        assert refused == Counter({(rule, CODES[rule], "fraud"): n
                                   for rule, n in want.items()}), user
    assert len(held) == sum(ADMITTED[u] for u in PARALLEL)

    # -- in the order Redis decided them: no call admitted after its value's block
    attempts = [a for a in _attempts(store) if a.dialog_id in user_of]
    assert sorted(a.dialog_id for a in attempts) == sorted(user_of)  # each decided once
    for user in USERS:
        order = ["admitted" if a.admitted else a.limit for a in attempts
                 if user_of[a.dialog_id] == user]
        assert order == _order(user), user

    # -- the states: every call counted, admitted or refused
    states = {rule: store.fraud_states(rule) for rule in RULES}
    assert set(states["volume"]) == set(states["watch"]) == set(USERS)
    assert set(states["parallel"]) == set(PARALLEL)
    for user in USERS:
        assert states["volume"][user].calls == states["watch"][user].calls == CALLS
        if user in SWEEP:  # one by one up to 64 (past every level), then the estimate
            assert abs(states["volume"][user].distinct - CALLS) <= CALLS // 20
        else:
            assert states["volume"][user].distinct == 1
        assert states["watch"][user].sequential == (1 if user in SWEEP else CALLS)
        assert states["watch"][user].short == (0 if user in PARALLEL else ADMITTED[user])
    for user in PARALLEL:
        assert states["parallel"][user].calls == CALLS

    # -- the events: per rule, value, statistic and level reached, exactly one, at the
    # level's count; none for a level not reached
    events = store.fraud_events(count=10_000)
    reached = {  # the highest count each statistic had
        "calls": lambda u: CALLS,
        "distinct_numbers": lambda u: states["volume"][u].distinct,
        "sequential": lambda u: states["watch"][u].sequential,
        "short_calls": lambda u: states["watch"][u].short,
        # the held calls and the one that would have been the next
        "concurrent": lambda u: ADMITTED[u] + 1,
    }
    want_events: Counter[tuple[str, str, str, str, int]] = Counter()
    for fr in RULES.values():
        for user in states[fr.name]:
            for stat, t in fr.stats.items():
                for level, thr in (("warning", t.warning), ("critical", t.critical)):
                    if thr is not None and reached[stat](user) >= thr:
                        want_events[(fr.name, user, stat, level, thr)] += 1
    got_events = Counter((e.rule, e.value, e.stat, e.level, e.count) for e in events)
    assert got_events == want_events
    assert all(e.count == e.threshold for e in events)
    assert len(events) == len(want_events) == 6 * len(USERS)
    for user in USERS:  # each user crossed what its kind of calls makes it cross
        assert {(e.rule, e.stat) for e in events if e.value == user} == \
            EXPECTED_EVENTS[user], user
    for e in events:
        fr = RULES[e.rule]
        assert (e.key, e.window) == (fr.key, fr.per)
        assert e.action == ("report" if e.level == "warning"
                            else "shadow" if fr.shadow else "block")
    for name, by_value in states.items():  # the levels each state remembers
        for user, st in by_value.items():
            assert st.levels == _levels_bits([e for e in events
                                              if (e.rule, e.value) == (name, user)])
    # the counters agree with the stream
    assert store.fraud_counts() == Counter((e.rule, e.level, e.stat) for e in events)

    # -- the blocks: every value a refusing rule's critical level was reached for
    blocks = store.fraud_blocks()
    critical = {(e.rule, e.value) for e in events
                if e.level == "critical" and not RULES[e.rule].shadow}
    assert {(b.rule, b.value) for b in blocks} == critical
    assert critical == {*(("volume", u) for u in USERS), *(("parallel", u) for u in PARALLEL)}
    now = store.now_ms()
    assert all(b.until_ms > now for b in blocks)
    decisions = store.decisions()
    for name in CODES:
        assert decisions[("fraud", name)] == sum(
            1 for s in seen if not s.admitted and s.limit == name)

    # -- release what is still up: every count back to 0
    assert store.profile_values("account") == {u: ADMITTED[u] for u in PARALLEL}
    for did in held:
        assert store.release(did, "cancel") is not None
    assert store.profile_size("total") == 0
    assert store.profile_values("user") == {}
    assert store.profile_values("account") == {}
    totals = store.stats()
    admitted = sum(ADMITTED.values())
    assert (totals["active"], totals["processed"], totals["rejected"], totals["ended"]) == (
        0, admitted, len(seen) - admitted, admitted)
    # a call hung up without an answer is no short call
    assert store.fraud_states("watch")[PARALLEL[0]].short == 0
    store.close()
