"""A live limit changed while the namespace is at its busiest (`policer limits set`
during the peak hour): every admit and end writes the counts hash the live limits are
kept in, so a change that read it and wrote it back under WATCH was retried for as
long as calls kept coming (hundreds of tries with three busy workers; with eight, one
change waited for 1.2 million admits). Workers here keep Redis busy with pipelined
admits and their releases; each change must be made while they run, and afterwards
every count equals the live calls and the last change is the limit in force.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

from policer.call import Call
from policer.engine import Engine
from policer.store import Op, RedisStore
from policer.store.keys import dialog_id
from tests.support import STORE_TIMEOUT_MS, new_namespace, with_namespace
from tests.support.policies import build_policy

WORKERS = 8
BATCH = 50
USERS = 10
MAX_BATCHES = 600  # per worker (some 10 s): the load's bound when a change never gets through
CHANGES = 5

POLICY = build_policy("busy", profiles={"total": {}, "user": "from_user"},
                      limits={"user": 1_000})


def _call(worker: int, i: int, j: int) -> Call:
    return Call.from_raw(f"busy-{worker}-{i}-{j}@test", "tag", from_user=f"u{j % USERS}",
                         ruri_user="5551234")


def _load(url: str, namespace: str, worker: int, started: Any, stop: Any, ended: Any,
          out: Any) -> None:
    """Batches of admits, then their releases, until told to stop (or MAX_BATCHES: then
    ``ended`` says so)."""
    store = RedisStore(url, namespace, STORE_TIMEOUT_MS,
                       policy=with_namespace(POLICY, namespace))
    started.wait()
    batches = 0
    while not stop.is_set() and batches < MAX_BATCHES:
        calls = [_call(worker, batches, j) for j in range(BATCH)]
        results = store.admit_calls(calls, f"node{worker}")
        store.apply([Op("release", dialog_id(c.call_id, c.from_tag), "bye")
                     for c, r in zip(calls, results, strict=True)
                     if not isinstance(r, Exception) and r.admitted])
        batches += 1
    if batches == MAX_BATCHES:
        ended.set()
    out.put(batches)


def test_a_live_limit_is_changed_while_calls_keep_coming(redis_url: str) -> None:
    ns = new_namespace()
    policy = with_namespace(POLICY, ns)
    store = RedisStore(redis_url, ns, STORE_TIMEOUT_MS, policy=policy)
    store.load(policy)
    ctx = mp.get_context("fork")
    started, stop, ended, out = ctx.Barrier(WORKERS + 1), ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_load, args=(redis_url, ns, w, started, stop, ended, out))
             for w in range(WORKERS)]
    for p in procs:
        p.start()
    olds: list[int | None] = []
    during_load: list[bool] = []

    def change() -> None:
        for k in range(CHANGES):
            olds.append(store.limit_set("user", "u1", 2 + k))
            during_load.append(not ended.is_set())

    started.wait()
    changer = threading.Thread(target=change)
    changer.start()
    changer.join(timeout=60)
    stop.set()
    batches = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    changer.join(timeout=60)
    assert not changer.is_alive()
    # every change was made while the workers still sent calls, each saw the one before
    assert during_load == [True] * CHANGES
    assert olds == [None, 2, 3, 4, 5]
    assert max(batches) < MAX_BATCHES
    # every call ended: every count is back to zero, and the last change is in force
    assert store.profile_size("total") == 0
    assert all(store.profile_size("user", f"u{j}") == 0 for j in range(USERS))
    assert store.limits("user") == {"u1": 2 + CHANGES - 1}
    engine = Engine(policy, store, node="check")
    got = [engine.admit(Call.from_raw(f"after-{i}@test", "t", from_user="u1",
                                      ruri_user="5551234")) for i in range(CHANGES + 2)]
    assert [d.admitted for d in got] == [True] * (CHANGES + 1) + [False]
    assert got[-1].limit == "user"
