"""Redis's instructions per call of the decision function, counted by callgrind: where
the time of a call goes inside Redis, free of the machine's noise (issue 16).

A private ``redis-server`` runs under ``valgrind --tool=callgrind``; each figure is the
instructions Redis executed for N requests sent one at a time, divided by N (user space
only: the system calls of a request, most of a PING's cost, are not counted). Rows:

- ``ping``: one ``PING``;
- ``empty fcall``: a library function that returns 1, called with the admit's number
  of arguments (the fixed cost of a function call);
- ``admit's commands``: a function that makes the admit's Redis commands (TIME, HMGET
  of the fields a 4-membership call reads, SET NX GET of a record, HSET of 4 counts,
  ZADD, HINCRBY, XADD of an attempt) with fixed arguments and no other Lua: the floor
  of an admit written in Lua over this data model;
- ``admit``, ``confirm``, ``release``: policer's library, a call joining
  ``--memberships`` profiles (warm: its user's plan cached, as in steady traffic), the
  answers and ends sent as a proxy does, 100 line ops per batch (per op).

With ``--policy`` (one or more files) the rows are instead one warm admit per policy
(its own ``redis-server``; 800 calls a round, the median of three rounds) from
``--users`` users (X-Account ``a<i>``) dialling ``--numbers`` numbers (1:
``5551234``; more: each call a number drawn at random from that many): what a policy's
rules cost a call against another's, e.g. the fraud rules (issue 19).

    .venv/bin/python -m benchmarks.instructions --memberships 4
    .venv/bin/python -m benchmarks.instructions --memberships 1 --calls 500
    .venv/bin/python -m benchmarks.instructions --numbers 1000 \
        --policy deploy/kamailio/bench_four.yaml deploy/kamailio/bench_four_fraud.yaml

With ``--cache LL`` (callgrind's cache simulation, the last-level cache given as
``size,ways,line``, e.g. ``262144,8,64``: small, standing in for the caches Kamailio and
SIPp share with Redis on a small machine) the ``--policy`` rows follow the Kamailio
bench instead: ``--calls`` calls (8000 unless given) of ``--users`` users in the bench's
order, each user dialling the bench's numbers in turn (``benchmarks.admit_time``'s
``dialled_numbers``), every admit counted from a fresh library (first calls included),
then every end; per call, the instructions and the data misses of the last-level cache.
A cold object costs a call about as much as a hundred instructions; this counts them
free of the machine's noise:

    .venv/bin/python -m benchmarks.instructions --cache 262144,8,64 --numbers 1000 \
        --policy deploy/kamailio/bench_four.yaml deploy/kamailio/bench_four_fraud.yaml
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.admit_time import dialled_numbers
from benchmarks.function_cost import membership_policy
from benchmarks.resp import Conn, pack
from lab.redis_server import free_port
from policer.call import Call
from policer.policy import Policy, load_policy, parse_policy
from policer.store import RedisStore
from policer.store.keys import dialog_id

#: the admit's commands in Lua, no other logic (and their twin in C: floor/floor.c)
FLOOR_LUA = Path(__file__).parent / "floor" / "floor.lua"


class Callgrind:
    """A redis-server under callgrind, and one connection to it."""

    def __init__(self, cache: str | None = None) -> None:
        if shutil.which("valgrind") is None:
            sys.exit("valgrind is not installed (apt install valgrind)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="policer-cg-")
        self.out = os.path.join(self.dir, "cg.out")
        sim = []
        if cache:
            sim = ["--cache-sim=yes", f"--LL={cache}", "--D1=32768,8,64", "--I1=32768,8,64"]
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", *sim, f"--callgrind-out-file={self.out}",
             "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        self.conn = Conn(self.port)
        self.send = self.conn.send
        self.cmd = self.conn.cmd
        self.dumps = 0

    def count(self, packed: list[bytes]) -> float:
        """Instructions per request of sending these one at a time."""
        return self.events(packed)["Ir"] / len(packed)

    def events(self, packed: list[bytes]) -> dict[str, int]:
        """callgrind's events (Ir, and the cache simulation's) of sending these one at a
        time, in all."""
        subprocess.run(["callgrind_control", "-z", str(self.proc.pid)], capture_output=True,
                       check=False)
        for p in packed:
            self.send(p)
        self.dumps += 1
        subprocess.run(["callgrind_control", "-d", f"d{self.dumps}", str(self.proc.pid)],
                       capture_output=True, check=False)
        path = f"{self.out}.{self.dumps}"
        text = ""
        for _ in range(300):
            text = Path(path).read_text() if os.path.exists(path) else ""
            if "totals:" in text:
                break
            time.sleep(0.1)
        names = re.search(r"^events: (.*)$", text, re.M)
        m = re.search(r"^(?:summary|totals): (.*)$", text, re.M)
        assert names and m, path
        # (a trailing zero may be left out)
        return dict(zip(names.group(1).split(), map(int, m.group(1).split()), strict=False))

    def close(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Traffic:
    """policer's library for a call joining ``memberships`` profiles, loaded into the
    Redis at ``port``, and the requests of whole calls as a proxy sends them: one admit
    per call, its answer and its end as line ops, 100 to a batch. The numbers dialled:
    ``dialled`` in turn when set, else one (``numbers`` 1) or drawn at random."""

    def __init__(self, port: int, memberships: int, users: int, policy: Policy | None = None,
                 numbers: int = 1, accounts: int | None = None) -> None:
        if policy is None:
            policy = parse_policy(membership_policy(memberships, users), "<bench>")
        self.numbers = numbers
        self.draw = random.Random(1)
        self.dialled: list[str] = []
        self.turn = 0
        self.store = RedisStore(f"redis://127.0.0.1:{port}/0", policy.namespace,
                                timeout_ms=120_000, policy=policy)
        self.store.load(policy)
        self.lib = self.store.library
        self.users = users
        #: accounts (X-Account ``a<i>``) the users share: user i is in account i % accounts
        self.accounts = accounts or users
        self.gen = 0

    def calls(self, n: int) -> list[Call]:
        """``n`` new calls of ``users`` users in ``accounts`` accounts."""
        self.gen += 1
        u, acc = self.users, self.accounts
        return [Call.from_raw(f"c{i}-{self.gen}@b", "t", from_user=f"u{i % u}",
                              from_domain="b.example", ruri_user=self.number(),
                              source_ip="10.0.0.1",
                              headers={"X-Account": f"a{i % u % acc}", "X-Tenant": "t"})
                for i in range(n)]

    def number(self) -> str:
        if self.dialled:
            self.turn += 1
            return self.dialled[(self.turn - 1) % len(self.dialled)]
        if self.numbers <= 1:
            return "5551234"
        return f"555{self.draw.randrange(self.numbers):04d}"

    def admits(self, cs: list[Call]) -> list[bytes]:
        lib, store = self.lib, self.store
        return [pack("FCALL", lib.function("admit"), 1, lib.prefix,
                     *store.call_arguments(c, "node", "A", store.deadline_ms(3_600_000)))
                for c in cs]

    def batches(self, cs: list[Call], op: bytes, arg: bytes) -> list[bytes]:
        """Line ops ``op``DIALOG``arg`` for these calls (b"+": answered, b"-" with
        b" bye": ended), 100 to a batch."""
        lib = self.lib
        out = []
        for i in range(0, len(cs), 100):
            ops = b"".join(op + dialog_id(c.call_id, "t").encode() + arg + b"\n"
                           for c in cs[i:i + 100])
            out.append(pack("FCALL", lib.function("batch"), 1, lib.prefix, ops, 0, 0,
                            lib.attributes_sig))
        return out

    def close(self) -> None:
        self.store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memberships", type=int, default=4, choices=(1, 2, 3, 4, 5, 6))
    p.add_argument("--calls", type=int, default=300, help="requests per figure")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--policy", nargs="+", type=Path, default=[],
                   help="rows: one warm admit per policy file instead")
    p.add_argument("--numbers", type=int, default=1, help="numbers dialled (--policy)")
    p.add_argument("--accounts", type=int, default=0,
                   help="accounts the users share (--policy; default: one per user)")
    p.add_argument("--cache", metavar="LL",
                   help="--policy rows in the Kamailio bench's order, with the last-level "
                        "cache's misses (size,ways,line)")
    a = p.parse_args()
    if a.policy and a.cache:
        calls = a.calls if "--calls" in sys.argv else 8000
        return bench_rows(a.policy, a.users, a.numbers, calls, a.cache, a.accounts)
    if a.policy:
        return policy_rows(a.policy, a.users, a.numbers, a.accounts)
    cg = Callgrind()
    try:
        n = a.calls
        cg.cmd("FUNCTION", "LOAD", "REPLACE", FLOOR_LUA.read_text())
        rows: list[tuple[str, float]] = []
        rows.append(("ping", cg.count([pack("PING")] * n)))
        empty = pack("FCALL", "empty", 1, "k", *[f"a{i}" for i in range(10)])
        rows.append(("empty fcall", cg.count([empty] * n)))
        floor = pack("FCALL", "cmds", 1, "k", "node", "c1-2@b", "t", "x" * 60, "A", "", "sig",
                     "", "1796400000", "50")
        rows.append(("admit's commands", cg.count([floor] * n)))

        traffic = Traffic(cg.port, a.memberships, a.users)
        calls, admits, batches = traffic.calls, traffic.admits, traffic.batches
        for c in admits(calls(n)):  # warm: the plans of these users cached
            cg.send(c)
        cs = calls(n)
        rows.append((f"admit ({a.memberships} memberships)", cg.count(admits(cs))))
        confirms = batches(cs, b"+", b"")
        rows.append(("confirm (per op)", cg.count(confirms) * len(confirms) / n))
        releases = batches(cs, b"-", b" bye")
        rows.append(("release (per op)", cg.count(releases) * len(releases) / n))
        traffic.close()
    finally:
        cg.close()
    print(f"instructions per request, {n} requests each (callgrind, user space: a "
          "request's system calls, most of a PING's time, are not counted)")
    for label, v in rows:
        print(f"  {label:<28}{v:>10,.0f}")
    whole = sum(v for _, v in rows[3:])
    print(f"  {'whole call':<28}{whole:>10,.0f}")
    return 0


def policy_rows(paths: list[Path], users: int, numbers: int, accounts: int = 0,
                calls: int = 800) -> int:
    """A warm admit's instructions per policy, each on a redis-server of its own."""
    rows: list[tuple[str, list[float]]] = []
    for path in paths:
        cg = Callgrind()
        try:
            traffic = Traffic(cg.port, 0, users, load_policy(path), numbers, accounts)
            for c in traffic.admits(traffic.calls(calls)):  # warm: the users' plans cached
                cg.send(c)
            rows.append((path.name, [cg.count(traffic.admits(traffic.calls(calls)))
                                     for _ in range(3)]))
            traffic.close()
        finally:
            cg.close()
    print(f"instructions per warm admit, {users} users ({accounts or users} accounts) "
          f"dialling {numbers} number(s), "
          f"{calls} calls a round (callgrind, user space), median of the rounds")
    first = statistics.median(rows[0][1])
    for label, each in rows:
        m = statistics.median(each)
        print(f"  {label:<32}{m:>10,.0f}  {m - first:>+9,.0f}   rounds: "
              + ", ".join(f"{v:,.0f}" for v in each))
    return 0


def bench_rows(paths: list[Path], users: int, numbers: int, calls: int, cache: str,
               accounts: int = 0) -> int:
    """Per policy, on a redis-server of its own: the admits of ``calls`` calls in the
    Kamailio bench's order, then their ends; instructions and last-level data misses per
    call."""
    rows: list[tuple[str, dict[str, float], dict[str, float]]] = []
    for path in paths:
        cg = Callgrind(cache)
        try:
            traffic = Traffic(cg.port, 0, users, load_policy(path), numbers, accounts)
            traffic.dialled = dialled_numbers(users, numbers)
            cs = traffic.calls(calls)
            admit = cg.events(traffic.admits(cs))
            end = cg.events(traffic.batches(cs, b"-", b" bye"))
            traffic.close()
        finally:
            cg.close()
        a_ll = admit.get("DLmr", 0) + admit.get("DLmw", 0)
        e_ll = end.get("DLmr", 0) + end.get("DLmw", 0)
        rows.append((path.name, {"Ir": admit["Ir"] / calls, "LL": a_ll / calls},
                     {"Ir": (admit["Ir"] + end["Ir"]) / calls, "LL": (a_ll + e_ll) / calls}))
    print(f"per call, {calls} calls of {users} users ({accounts or users} accounts) in the "
          f"Kamailio bench's order dialling "
          f"{numbers} number(s), first calls included (callgrind, user space; last-level "
          f"cache {cache}): instructions and last-level data misses")
    print(f"  {'':<32}{'admit Ir':>10}{'LL misses':>11}{'call Ir':>10}{'LL misses':>11}")
    for label, a, c in rows:
        print(f"  {label:<32}{a['Ir']:>10,.0f}{a['LL']:>11,.0f}{c['Ir']:>10,.0f}"
              f"{c['LL']:>11,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
