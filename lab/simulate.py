"""``policer simulate``: a live simulation of many proxy workers.

Several worker processes place calls (local, domestic, international and
emergency numbers, several users and accounts) against one policy through
one shared store, answer most, hang up after a random hold time. The main
process prints, every second, each profile's count against its limit and
the cluster-wide admitted / rejected counters; when the callers stop it shows
every count back at zero.

With no store URL given it starts a private ``redis-server`` (or, when none is
installed, uses the in-process store with threads instead of processes) and
says which.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from lab.redis_server import RedisServer, RedisServerError, find_redis_server
from policer.call import Call
from policer.engine import Engine
from policer.log import configure
from policer.policy import Policy, PolicyError, load_policy
from policer.snapshot import take_snapshot
from policer.store import MemoryStore, Store, open_store

__all__ = ["main", "run"]

USERS = [f"user{i:02d}" for i in range(60)]
ACCOUNTS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell", ""]
NUMBERS = [
    ("5551234", 40),  # local
    ("0301234567", 25),  # domestic
    ("00441632960123", 18),  # international
    ("+33612345678", 7),  # international
    ("112", 3),  # emergency
    ("110", 2),  # emergency
]


def _pick_number(rng: random.Random) -> str:
    return rng.choices([n for n, _ in NUMBERS], weights=[w for _, w in NUMBERS])[0]


def worker(engine_factory: Callable[[], Engine], wid: int, rate: float, hold: float,
           stop_at: float) -> None:
    """Place calls until ``stop_at``, then hang up every call still up."""
    engine = engine_factory()
    rng = random.Random(os.getpid() ^ wid)
    header = engine.policy.header_names[0] if engine.policy.header_names else "x-account"
    live: list[tuple[float, str, bool]] = []  # (end time, dialog id, answered)
    seq = 0
    next_call = time.monotonic()
    while time.monotonic() < stop_at:
        now = time.monotonic()
        while live and live[0][0] <= now:
            _, did, answered = heapq.heappop(live)
            engine.release(did, "bye" if answered else "cancel")
        if now >= next_call:
            seq += 1
            account = rng.choice(ACCOUNTS)
            call = Call.from_raw(
                f"sim-{wid}-{seq}-{rng.getrandbits(32):08x}", f"t{seq}",
                from_user=rng.choice(USERS), from_domain="sim.example",
                ruri_user=_pick_number(rng), source_ip="127.0.0.1",
                headers={header: account} if account else {},
            )
            d = engine.admit(call)
            if d.admitted:
                answered = rng.random() < 0.85
                if answered:
                    engine.confirm(d.dialog_id)
                duration = rng.expovariate(1 / hold) if answered else rng.uniform(0.2, 1.0)
                heapq.heappush(live, (now + duration, d.dialog_id, answered))
            next_call += rng.expovariate(rate)
        time.sleep(max(0.0, min(next_call, live[0][0] if live else next_call) - time.monotonic()))
    for _, did, answered in live:
        engine.release(did, "bye" if answered else "cancel")


def _engine_factory(policy_path: str, url: str, node: str) -> Engine:
    policy = load_policy(policy_path)
    store = open_store(url, policy.namespace, timeout_ms=1000, policy=policy)
    return Engine(policy, store, node=node)


def _process_worker(policy_path: str, url: str, wid: int, rate: float,
                    hold: float, stop_at: float) -> None:
    configure(level="warning")
    worker(lambda: _engine_factory(policy_path, url, f"sim-worker-{wid}"), wid, rate, hold,
           stop_at)


def _view(policy: Policy, store: Store, started: float, phase: str) -> tuple[str, int]:
    """One frame of the live view and the total of all counts."""
    snap = take_snapshot(policy, store, top=1)
    busiest = {r.profile: r for r in snap.values}
    valued = {p.name for p in policy.profiles if p.valued}
    lines = [f"--- t={time.monotonic() - started:5.1f}s  {phase}",
             f"{'profile':<16}{'count':>7}{'limit':>8}  {'busiest value':<22}"
             f"{'admitted':>9}{'rejected':>9}{'bypassed':>9}"]
    for row in snap.rows:
        limit = policy.limits.get(row.profile)
        lim = "-" if limit is None else str(limit.max)
        top = ""
        if row.profile in busiest:
            b = busiest[row.profile]
            top = f"{b.value} {b.count}/{b.limit if b.limit is not None else '-'}"
        if row.profile in valued and limit:
            lim += "/val"
        bypassed = snap.decided("bypassed", row.profile)
        lines.append(f"{row.profile:<16}{row.count:>7}{lim:>8}  {top:<22}"
                     f"{snap.decided('admitted', row.profile) + bypassed:>9}"
                     f"{snap.decided('rejected', row.profile):>9}{bypassed:>9}")
    return "\n".join(lines), sum(r.count for r in snap.rows)


def main(argv: list[str] | None = None) -> int:
    """``policer simulate`` (``python -m lab.simulate``)."""
    p = argparse.ArgumentParser(prog="policer simulate", description="a live simulation: "
                                "worker processes place calls through a real Redis")
    p.add_argument("--seconds", type=float, default=8.0, help="how long callers place calls")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rate", type=float, default=30.0, help="calls per second per worker")
    p.add_argument("--hold", type=float, default=1.5, help="mean call duration, seconds")
    g = p.add_argument_group("common options")
    g.add_argument("--policy", default=None, metavar="FILE",
                   help="policy file (env POLICER_POLICY, default policies/example.yaml)")
    g.add_argument("--redis", default=None, metavar="URL",
                   help="store URL (env POLICER_REDIS_URL; default: a private redis-server)")
    g.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--log-level", default=None, help="debug, info, warning, error")
    g.add_argument("--log-format", default=None, choices=("json", "console"))
    args = p.parse_args(argv)
    configure(args.log_level, args.log_format)
    try:
        return run(args)
    except PolicyError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    policy_path = args.policy or os.environ.get("POLICER_POLICY") or "policies/example.yaml"
    policy = load_policy(policy_path)
    url = args.redis or os.environ.get("POLICER_REDIS_URL")
    server: RedisServer | None = None
    if url is None and find_redis_server() is not None:
        try:
            server = RedisServer().start()
            url = server.url
            print(f"store: private redis-server started at {url} (pid {server.pid})")
        except RedisServerError as e:
            print(f"store: could not start redis-server ({e}); using the in-process store")
    elif url is None:
        print("store: no redis-server installed; using the in-process store (threads)")
    else:
        print(f"store: {url}")
    try:
        return _run(args, policy, policy_path, url)
    finally:
        if server is not None:
            server.stop()
            print("store: private redis-server stopped")


def _run(args: argparse.Namespace, policy: Policy, policy_path: str, url: str | None) -> int:
    shared: Store
    if url is None or url.startswith("memory:"):
        shared = MemoryStore(policy.namespace)
    else:
        shared = open_store(url, policy.namespace, timeout_ms=2000, policy=policy)
    print(f"policy: {policy_path} (namespace {policy.namespace}); {args.workers} workers x "
          f"{args.rate:g} calls/s, mean hold {args.hold:g}s, for {args.seconds:g}s")
    started = time.monotonic()
    stop_at = started + args.seconds
    runners: list[Any] = []
    if isinstance(shared, MemoryStore):
        store = shared
        for wid in range(args.workers):
            t = threading.Thread(target=worker, daemon=True, args=(
                lambda: Engine(policy, store, node="sim"), wid, args.rate, args.hold,
                stop_at))
            t.start()
            runners.append(t)
    else:
        assert url is not None
        ctx = mp.get_context("fork") if sys.platform != "win32" else mp.get_context()
        for wid in range(args.workers):
            proc = ctx.Process(target=_process_worker, args=(
                policy_path, url, wid, args.rate, args.hold, stop_at))
            proc.start()
            runners.append(proc)
    try:
        while any(r.is_alive() for r in runners):
            time.sleep(1.0)
            phase = "placing calls" if time.monotonic() < stop_at else "callers hanging up"
            frame, _ = _view(policy, shared, started, phase)
            print(frame, flush=True)
    finally:
        for r in runners:
            r.join(timeout=30)
    frame, total = _view(policy, shared, started, "all callers done")
    print(frame)
    stats = shared.stats()
    print("stats: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    if total == 0 and stats["active"] == 0:
        print("every count is back at zero")
        return 0
    print(f"ERROR: {total} memberships and {stats['active']} dialogs still counted")
    return 1


if __name__ == "__main__":
    sys.exit(main())
