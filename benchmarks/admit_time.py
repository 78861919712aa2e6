"""The time Redis spends inside the admit function per call (``INFO commandstats``'s
``FCALL`` µs per call), policy against policy, on a lone Redis: a quick loop for the
function's own cost (no round trips, no Kamailio), which ``deploy/kamailio/bench``
confirms as Redis CPU per whole call.

Calls are sent as a proxy's native cfg sends them (mode ``A``), pipelined 100 at a
time, from ``--users`` users (From user ``u<i>``, X-Account ``acct<i>``) dialling
``--number``, or with ``--numbers N`` each user 16 numbers drawn from N in turn (as
``deploy/kamailio/bench --numbers`` dials them); then released. The first round is
every plan's first call (cold: the library is loaded fresh), the next ones call again
(warm). With ``--parents`` every hierarchy level of the policy gets live parents for
the users' accounts (``acct<i>`` under ``<level initial><i mod 100>``, each level above
ten times fewer), as ``policer parent set`` keeps them.

    .venv/bin/python -m benchmarks.admit_time deploy/kamailio/bench_four.yaml \\
        deploy/kamailio/bench_four_fraud.yaml
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path
from typing import Any

import redis

from lab.redis_server import RedisServer
from policer.call import Call
from policer.policy import load_policy
from policer.protocol import NATIVE_REPLY
from policer.store import Op, RedisStore

_DID = NATIVE_REPLY.index("dialog_id")


def _set_parents(store: RedisStore, levels: list[str], users: int) -> None:
    children = [f"acct{i}" for i in range(users)]
    width = 100
    for name in levels:
        pairs = {c: f"{name[0]}{i % max(1, width)}" for i, c in enumerate(children)}
        for child, parent in pairs.items():
            store.parent_set(name, child, parent)
        children = sorted(set(pairs.values()))
        width //= 10


#: with --numbers, how many numbers each user dials in turn
ROUNDS_PER_USER = 16


def dialled_numbers(users: int, numbers: int, number: str = "5551000") -> list[str]:
    """The number each call dials, taken in turn: ``number`` for each user (one
    number); else ``ROUNDS_PER_USER`` calls a user, each a number of ``numbers`` (555
    and four digits, the bench policies' domestic class) drawn at random (a fixed seed:
    every run dials the same). ``deploy/kamailio/bench`` writes them into SIPp's
    injection file."""
    if numbers <= 1:
        return [number] * users
    draw = random.Random(1)
    return [f"555{draw.randrange(numbers):04d}" for _ in range(users * ROUNDS_PER_USER)]


def measure(path: Path, calls: int, users: int, rounds: int, number: str,
            parents: bool, numbers: int = 1) -> list[float]:
    """FCALL µs per call of each round (the first: cold)."""
    server = RedisServer(extra_args=["--appendonly", "no", "--save", ""]).start()
    try:
        policy = load_policy(path)
        store = RedisStore(server.url, policy.namespace, timeout_ms=10_000, policy=policy)
        store.load(policy)
        if parents:
            _set_parents(store, [p.name for p in policy.profiles if p.parent_of], users)
        lib = store.library
        fn = lib.function("admit")
        r = redis.Redis.from_url(server.url)
        out: list[float] = []
        rows = dialled_numbers(users, numbers, number)
        for k in range(rounds):
            batch = [Call.from_raw(f"c{k}-{i}", "t", from_user=f"u{i % users}",
                                   from_domain="127.0.0.1", ruri_user=rows[i % len(rows)],
                                   to_user=rows[i % len(rows)], source_ip="127.0.0.1",
                                   headers={"X-Account": f"acct{i % users}"})
                     for i in range(calls)]
            r.config_resetstat()
            dids: list[str] = []
            for j in range(0, calls, 100):
                pipe: Any = r.pipeline(transaction=False)
                for c in batch[j:j + 100]:
                    pipe.execute_command("FCALL", fn, 1, lib.prefix,
                                         *store.call_arguments(c, "n1", "A"))
                dids += [x[_DID].decode() for x in pipe.execute()]
            f = r.info("commandstats")["cmdstat_fcall"]
            out.append(f["usec"] / f["calls"])
            for j in range(0, len(dids), 200):
                store.apply([Op("release", d, "bye") for d in dids[j:j + 200]])
        store.close()
        return out
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policies", nargs="+", type=Path)
    p.add_argument("--calls", type=int, default=8000, help="calls per round")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3, help="the first is cold")
    p.add_argument("--repeats", type=int, default=3, help="policies interleaved")
    p.add_argument("--number", default="5551000")
    p.add_argument("--numbers", type=int, default=1,
                   help=f"each user dials {ROUNDS_PER_USER} numbers drawn from this many, "
                        "in turn")
    p.add_argument("--parents", action="store_true",
                   help="live parents for every hierarchy level")
    a = p.parse_args()
    cold: dict[Path, list[float]] = {x: [] for x in a.policies}
    warm: dict[Path, list[float]] = {x: [] for x in a.policies}
    for rep in range(a.repeats):
        for path in a.policies:
            got = measure(path, a.calls, a.users, a.rounds, a.number, a.parents, a.numbers)
            cold[path].append(got[0])
            warm[path] += got[1:]
            print(f"repeat {rep + 1} {path.name}: " + ", ".join(f"{x:.1f}" for x in got),
                  flush=True)
    print("\nFCALL µs per call, medians (cold: each plan's first call; warm: again)")
    for path in a.policies:
        print(f"  {path.name:<28} cold {statistics.median(cold[path]):6.1f}   "
              f"warm {statistics.median(warm[path]) if warm[path] else 0:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
