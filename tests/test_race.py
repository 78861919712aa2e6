"""Many processes admit at once against one limit of N through the engine and
one Redis: never more than N hold a slot, never fewer when calls are turned
away, and every released call gives its slot back.

Over-admission is looked for in three ways: the store's own count read back
after every admission, the count each decision reports, and an independent
Redis counter that every process increments while it holds a call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import redis

from policer.call import Call
from policer.engine import Engine
from policer.store import RedisStore
from tests.support import STORE_TIMEOUT_MS, new_namespace, with_namespace
from tests.support.policies import build_policy
from tests.support.race import PROCESSES, run_workers

N = 10
DECISIONS = 10_000

#: at most N calls, each user's counted
POLICY = build_policy("race", profiles={"total": {}, "user": "from_user"}, limits={
    "total": {"max": N, "reject": {"code": 503, "reason": "Busy", "retry_after": 5}}})


@dataclass
class Result:
    admitted: int = 0
    rejected: int = 0
    released: int = 0
    over: int = 0  # observations of more than N holders
    rejected_with_room: int = 0  # a rejection that saw fewer than N
    errors: int = 0  # fallbacks: the store did not answer
    max_seen: int = 0


def _engine(url: str, namespace: str) -> Engine:
    return Engine(with_namespace(POLICY, namespace), RedisStore(url, namespace, STORE_TIMEOUT_MS),
                  node="race")


def _call(worker: int, i: int) -> Call:
    return Call.from_raw(f"race-{worker}-{i}@test", f"tag{worker}", from_user=f"w{worker}",
                         ruri_user="5551234")


def _burst(url: str, namespace: str, worker: int, attempts: int, barrier: Any,
           out: Any) -> None:
    """Everybody at once, nobody releases: only N in total may get through."""
    engine = _engine(url, namespace)
    barrier.wait()
    admitted, bad = [], 0
    for i in range(attempts):
        d = engine.admit(_call(worker, i))
        if d.admitted:
            admitted.append(d.dialog_id)
        elif d.fallback or (d.count, d.max) != (N, N):
            bad += 1
    out.put((admitted, bad))


def _churn(url: str, namespace: str, worker: int, decisions: int, barrier: Any,
           out: Any) -> None:
    """Admit; while holding a call, check nobody is over N; release at random."""
    engine = _engine(url, namespace)
    store = engine.store
    assert isinstance(store, RedisStore)
    witness = redis.Redis.from_url(url, decode_responses=True)
    witness_key = f"race-witness:{namespace}"
    rng = random.Random(worker)
    held: list[str] = []
    res = Result()
    barrier.wait()
    for i in range(decisions):
        d = engine.admit(_call(worker, 1_000_000 + i))
        if d.fallback:
            res.errors += 1
        elif d.admitted:
            res.admitted += 1
            held.append(d.dialog_id)
            holders = int(witness.incr(witness_key))
            size = store.profile_size("total")
            res.max_seen = max(res.max_seen, size, holders)
            if size > N or holders > N:
                res.over += 1
        else:
            res.rejected += 1
            if d.count != N or d.max != N:
                res.rejected_with_room += 1
        # release now and then, so that the limit is hit and freed all the time
        while held and rng.random() < 0.45:
            did = held.pop(rng.randrange(len(held)))
            witness.decr(witness_key)
            if engine.release(did, "bye") is not None:
                res.released += 1
    for did in held:
        witness.decr(witness_key)
        if engine.release(did, "bye") is not None:
            res.released += 1
    out.put(res)


def test_a_burst_admits_exactly_n(redis_url: str) -> None:
    ns = new_namespace()
    results = run_workers(_burst, redis_url, ns, 4)
    admitted = [did for ids, _ in results for did in ids]
    assert len(admitted) == N
    assert sum(bad for _, bad in results) == 0  # every rejection saw exactly N of N
    store = RedisStore(redis_url, ns, STORE_TIMEOUT_MS)
    assert store.profile_size("total") == N
    s = store.stats()
    assert (s["processed"], s["rejected"], s["active"]) == (N, PROCESSES * 4 - N, N)
    for did in admitted:
        assert store.release(did, "bye") is not None
    assert store.profile_size("total") == 0
    assert store.profile_values("user") == {}


def test_concurrent_admit_and_release_never_exceeds_n(redis_url: str) -> None:
    ns = new_namespace()
    results: list[Result] = run_workers(_churn, redis_url, ns, DECISIONS // PROCESSES)
    admitted = sum(r.admitted for r in results)
    rejected = sum(r.rejected for r in results)
    assert sum(r.errors for r in results) == 0
    assert admitted + rejected == DECISIONS
    assert sum(r.over for r in results) == 0
    assert max(r.max_seen for r in results) == N  # the limit was reached, never passed
    assert sum(r.rejected_with_room for r in results) == 0
    assert rejected > 0 and admitted > N
    # none lost on release
    assert sum(r.released for r in results) == admitted
    store = RedisStore(redis_url, ns, STORE_TIMEOUT_MS)
    assert store.profile_size("total") == 0
    assert store.profile_values("user") == {}
    s = store.stats()
    assert (s["active"], s["processed"], s["rejected"], s["ended"]) == (
        0, admitted, rejected, admitted)
    assert store.decisions() == {("admitted", "total"): admitted,
                                 ("admitted", "user"): admitted,
                                 ("rejected", "total"): rejected}
    assert len(store.call_records(count=admitted + 10)) == admitted
