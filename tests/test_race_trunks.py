"""16 processes at once against gateway caps and a hierarchy, through the engine and one
Redis: no gateway, carrier, customer or reseller ever holds more calls than its max,
also while calls move between gateways and customers move between resellers; every
count returns to 0.

Over-admission is looked for as in test_race.py: the store's count read back after
every call taken, and an independent Redis counter per gateway (per reseller) that each
process increments while its call holds it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import redis

from policer.call import Call
from policer.engine import Engine
from policer.policy import Policy
from policer.store import RedisStore
from tests.support import STORE_TIMEOUT_MS, new_namespace, with_namespace
from tests.support.policies import build_policy
from tests.support.race import PROCESSES, run_workers

DECISIONS = 4_000
GATEWAYS = {"10.0.0.1:5060": 3, "10.0.0.2:5060": 3, "10.0.0.3:5060": 2}
CARRIER_MAX = 6  # fewer than the gateways' 8: the level above them trips too

TRUNKS = build_policy(
    "race-trunks", version=2,
    profiles={"total": {}, "trunk": "gateway", "carrier": {"value": {"parent": "trunk"}}},
    limits={"trunk": {"values": {gw: {"max": n} for gw, n in GATEWAYS.items()}},
            "carrier": CARRIER_MAX},
    parents={"carrier": dict.fromkeys(GATEWAYS, "acme")})

CUSTOMERS = [f"c{i}" for i in range(16)]
RESELLERS = ("r0", "r1")
CUSTOMER_MAX, RESELLER_MAX = 2, 5
HIERARCHY = build_policy(
    "race-hier", version=2, attributes={"account": "header:X-Account"},
    profiles={"customer": "account",
              "reseller": {"value": {"parent": "customer"}, "on_missing_parent": "reject"}},
    limits={"customer": CUSTOMER_MAX, "reseller": RESELLER_MAX})


@dataclass
class Result:
    taken: int = 0
    full: int = 0
    admitted: int = 0
    rejected: int = 0
    over: int = 0
    errors: int = 0
    max_seen: dict[str, int] = field(default_factory=dict)


def _engine(policy: Policy, url: str, namespace: str) -> Engine:
    return Engine(with_namespace(policy, namespace), RedisStore(url, namespace, STORE_TIMEOUT_MS),
                  node="race")


def _worker(policy: Policy, url: str, namespace: str, worker: int
            ) -> tuple[Engine, RedisStore, redis.Redis, random.Random]:
    """A worker's engine, its store, a connection for the witness counters, its dice."""
    engine = _engine(policy, url, namespace)
    store = engine.store
    assert isinstance(store, RedisStore)
    return (engine, store, redis.Redis.from_url(url, decode_responses=True),
            random.Random(worker))


def _seen(res: Result, key: str, n: int) -> None:
    res.max_seen[key] = max(res.max_seen.get(key, 0), n)


def _gateways(url: str, namespace: str, worker: int, decisions: int, barrier: Any,
              out: Any) -> None:
    """Admit, then take the first gateway with room; now and then a gateway fails and
    the call moves on; release at random."""
    engine, store, witness, rng = _worker(TRUNKS, url, namespace, worker)
    held: list[tuple[str, str]] = []  # (dialog id, gateway)
    res = Result()
    order = list(GATEWAYS)

    def take(did: str, start: int) -> str | None:
        for gw in order[start:]:
            r = engine.egress(did, gw)
            if r.fallback:
                res.errors += 1
                return None
            if r.taken:
                return gw
            res.full += 1
        return None

    def hold(did: str, gw: str) -> None:
        res.taken += 1
        n = int(witness.incr(f"race-witness:{namespace}:{gw}"))
        c = int(witness.incr(f"race-witness:{namespace}:carrier"))
        size = store.profile_size("trunk", gw)
        carrier = store.profile_size("carrier", "acme")
        _seen(res, gw, max(n, size))
        _seen(res, "carrier", max(c, carrier))
        if max(n, size) > GATEWAYS[gw] or max(c, carrier) > CARRIER_MAX:
            res.over += 1

    def let_go(gw: str) -> None:
        witness.decr(f"race-witness:{namespace}:{gw}")
        witness.decr(f"race-witness:{namespace}:carrier")

    barrier.wait()
    for i in range(decisions):
        d = engine.admit(Call.from_raw(f"gw-{worker}-{i}@race", "t", ruri_user="5551000"))
        if d.fallback:
            res.errors += 1
            continue
        gw = take(d.dialog_id, 0)
        if gw is None:
            engine.release(d.dialog_id, "failed")
        else:
            hold(d.dialog_id, gw)
            held.append((d.dialog_id, gw))
        # a gateway that fails: the call moves to the next one with room (or fails)
        if held and rng.random() < 0.2:
            did, gw = held.pop(rng.randrange(len(held)))
            let_go(gw)
            nxt = take(did, order.index(gw) + 1)
            if nxt is None:
                engine.release(did, "failed")
            else:
                hold(did, nxt)
                held.append((did, nxt))
        while held and rng.random() < 0.45:
            did, gw = held.pop(rng.randrange(len(held)))
            let_go(gw)
            engine.release(did, "bye")
    for did, gw in held:
        let_go(gw)
        engine.release(did, "bye")
    out.put(res)


def _hierarchy(url: str, namespace: str, worker: int, decisions: int, barrier: Any,
               out: Any) -> None:
    """Calls of every customer at once while worker 0 moves customers between resellers:
    each call holds the reseller it joined until it ends."""
    engine, store, witness, rng = _worker(HIERARCHY, url, namespace, worker)
    held: list[tuple[str, str]] = []  # (dialog id, reseller)
    res = Result()
    barrier.wait()
    for i in range(decisions):
        if worker == 0 and i % 5 == 0:
            store.parent_set("reseller", rng.choice(CUSTOMERS), rng.choice(RESELLERS))
        customer = rng.choice(CUSTOMERS)
        d = engine.admit(Call.from_raw(f"h-{worker}-{i}@race", "t", ruri_user="5551000",
                                       headers={"X-Account": customer}))
        if d.fallback:
            res.errors += 1
        elif d.admitted:
            res.admitted += 1
            reseller = next(m.partition("=")[2] for m in d.memberships
                            if m.startswith("reseller="))
            n = int(witness.incr(f"race-witness:{namespace}:{reseller}"))
            size = store.profile_size("reseller", reseller)
            cust = store.profile_size("customer", customer)
            _seen(res, reseller, max(n, size))
            _seen(res, "customer", cust)
            if max(n, size) > RESELLER_MAX or cust > CUSTOMER_MAX:
                res.over += 1
            held.append((d.dialog_id, reseller))
        else:
            res.rejected += 1
        while held and rng.random() < 0.45:
            did, reseller = held.pop(rng.randrange(len(held)))
            witness.decr(f"race-witness:{namespace}:{reseller}")
            engine.release(did, "bye")
    for did, reseller in held:
        witness.decr(f"race-witness:{namespace}:{reseller}")
        engine.release(did, "bye")
    out.put(res)


def test_gateways_and_their_carrier_are_never_over_their_max(redis_url: str) -> None:
    ns = new_namespace()
    results = run_workers(_gateways, redis_url, ns, DECISIONS // PROCESSES)
    assert sum(r.errors for r in results) == 0
    assert sum(r.over for r in results) == 0
    seen = {k: max(r.max_seen.get(k, 0) for r in results) for k in (*GATEWAYS, "carrier")}
    # the carrier cap (6) was reached, never passed; no gateway passed its own
    assert seen["carrier"] == CARRIER_MAX
    assert all(seen[gw] <= n for gw, n in GATEWAYS.items())
    assert sum(r.full for r in results) > 0 and sum(r.taken for r in results) > CARRIER_MAX
    store = RedisStore(redis_url, ns, STORE_TIMEOUT_MS)
    assert store.profile_values("trunk") == {}
    assert store.profile_values("carrier") == {}
    assert store.profile_size("total") == 0


def test_resellers_are_never_over_their_max_while_customers_move(redis_url: str) -> None:
    ns = new_namespace()
    store = RedisStore(redis_url, ns, STORE_TIMEOUT_MS)
    for i, c in enumerate(CUSTOMERS):
        store.parent_set("reseller", c, RESELLERS[i % 2])
    results = run_workers(_hierarchy, redis_url, ns, DECISIONS // PROCESSES)
    assert sum(r.errors for r in results) == 0
    assert sum(r.over for r in results) == 0
    assert max(r.max_seen.get(x, 0) for r in results for x in RESELLERS) == RESELLER_MAX
    assert sum(r.rejected for r in results) > 0
    assert store.profile_values("reseller") == {}
    assert store.profile_values("customer") == {}
