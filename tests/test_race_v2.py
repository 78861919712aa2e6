"""Many processes at once against one call rate and one calendar window (issue 9),
through the engine and one Redis: a rate of N per minute lets exactly its burst of N
through, a window of N per minute exactly N, and calls a user cap rejects spend none
of the account's tokens or window counts while others are admitted around them.

Nothing here asserts a timing: the store's clock is read before and after each race,
and when more than one emission interval passed, the tokens that time regenerated are
allowed (a window race is started just after a minute boundary, and allowed the next
window's calls only if it ran past it).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Mapping
from typing import Any

import redis

from policer.call import Call
from policer.engine import Engine
from policer.store import RedisStore
from tests.support import STORE_TIMEOUT_MS, new_namespace, policy_text
from tests.support.policies import ACCOUNT, policy_yaml

PROCESSES = 16
ATTEMPTS = 4  # per process: 64 calls against a limit of N
N = 10
T_MS = 60_000 // N  # the rate's emission interval: 6 s

def race_policy(**limits: Mapping[str, Any] | int) -> str:
    return policy_yaml("race", version=2, attributes=ACCOUNT,
                       profiles={"total": {}, "account": "account", "user": "from_user"},
                       limits=limits)


RATE = race_policy(account={"rate": {"max": N, "per": "1m"},
                            "rate_reject": {"code": 503, "reason": "Call Rate Exceeded"}})
WINDOW = race_policy(account={"calls": [{"max": N, "per": "1m"}],
                              "reject": {"code": 486, "reason": "Minute Cap"}})
#: the account's rate and window are checked before the user's cap (profile order)
SPEND = race_policy(account={"rate": {"max": 100, "per": "1h"},
                             "calls": [{"max": 1000, "per": "1d"}]},
                    user=1)


def _call(worker: int, i: int, user: str) -> Call:
    return Call.from_raw(f"race2-{worker}-{i}@test", f"tag{worker}", from_user=user,
                         ruri_user="5551234", headers={"X-Account": "acme"})


def _fire(url: str, namespace: str, policy: str, offset: int, worker: int, barrier: Any,
          out: Any) -> None:
    """Everybody at once, nobody releases. Even workers call as one user (its cap of 1
    rejects all but one such call in SPEND), odd ones as a new user every call."""
    store = RedisStore(url, namespace, STORE_TIMEOUT_MS)
    store.clock_offset_ms = offset
    engine = Engine(policy_text(policy, namespace), store, node=f"race{worker}")
    barrier.wait()
    got = []
    for i in range(ATTEMPTS):
        user = "alice" if worker % 2 == 0 else f"w{worker}-{i}"
        d = engine.admit(_call(worker, i, user))
        got.append((d.admitted, d.fallback, d.kind, d.code, d.limit, d.retry_after))
    out.put(got)


def _race(url: str, policy: str, offset: int = 0
          ) -> tuple[RedisStore, list[tuple[Any, ...]], int, int]:
    """Load the policy, fire every process at once; returns the store, every decision,
    and the store's clock before and after."""
    ns = new_namespace()
    store = RedisStore(url, ns, STORE_TIMEOUT_MS)
    store.clock_offset_ms = offset
    store.load(policy_text(policy, ns))
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(PROCESSES + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_fire, args=(url, ns, policy, offset, w, barrier, out))
             for w in range(PROCESSES)]
    for p in procs:
        p.start()
    barrier.wait()
    before = store.now_ms()
    results = [d for _ in procs for d in out.get(timeout=120)]
    after = store.now_ms()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(results) == PROCESSES * ATTEMPTS
    assert not any(fallback for _, fallback, *_ in results)  # Redis answered every call
    return store, results, before, after


def test_a_rate_of_n_per_minute_admits_exactly_n_at_once(redis_url: str) -> None:
    store, results, before, after = _race(redis_url, RATE)
    admitted = sum(1 for ok, *_ in results if ok)
    # the burst is N; a token more for every emission interval the race took
    assert N <= admitted <= N + (after - before) // T_MS
    rejected = [r for r in results if not r[0]]
    assert rejected and all(
        (kind, code, limit) == ("rate", 503, "account") and 1 <= retry <= T_MS // 1000
        for _, _, kind, code, limit, retry in rejected)
    assert store.profile_size("account", "acme") == admitted
    s = store.stats()
    assert (s["processed"], s["rejected"]) == (admitted, len(rejected))
    u = store.usage("account", "acme")
    assert u.rate is not None and u.rate <= admitted / N


def test_a_window_of_n_per_minute_admits_exactly_n_at_once(redis_url: str) -> None:
    sec, usec = redis.Redis.from_url(redis_url).time()
    now = sec * 1000 + usec // 1000  # Redis's clock
    boundary = now - now % 60_000 + 60_000
    store, results, before, after = _race(redis_url, WINDOW, boundary + 1_000 - now)
    assert before >= boundary
    admitted = sum(1 for ok, *_ in results if ok)
    # one window, unless the race ran past its end (then the next one's N too)
    assert admitted == N or (after >= boundary + 60_000 and admitted <= 2 * N)
    rejected = [r for r in results if not r[0]]
    assert all((kind, code) == ("calls", 486) for _, _, kind, code, _, _ in rejected)
    if after < boundary + 60_000:
        assert store.usage("account", "acme").calls == {"1m": N}
        # Retry-After: the seconds to the window's end
        assert all(1 <= r[5] <= 60 for r in rejected)


def test_calls_a_user_cap_rejects_spend_nothing_under_a_race(redis_url: str) -> None:
    store, results, before, after = _race(redis_url, SPEND)
    admitted = sum(1 for ok, *_ in results if ok)
    rejected = [r for r in results if not r[0]]
    # every call of a new user passes, and one of alice's
    assert admitted == PROCESSES // 2 * ATTEMPTS + 1
    assert len(rejected) == PROCESSES // 2 * ATTEMPTS - 1
    assert all((kind, limit) == ("concurrent", "user") for _, _, kind, _, limit, _ in rejected)
    # the account counted the admitted calls only: its window and its tokens
    u = store.usage("account", "acme")
    assert u.calls == {"1d": admitted}
    assert u.rate is not None
    owed = u.rate * 100  # calls owed to the rate (burst 100, one per 36 s)
    assert admitted - 1 - (after - before) / 36_000 <= owed <= admitted
    assert store.profile_size("account", "acme") == admitted
    assert store.profile_size("user", "alice") == 1
