"""What a C Redis module would reach (issue 16): Redis's CPU per whole call of the
same commands made from a Lua function and from a module, and of policer's library,
each over a PING per call measured in the same run.

A private ``redis-server`` loads ``benchmarks/floor/floor.c`` (built here against the
``redismodule.h`` of the server's own version, which Debian does not ship: take it from
a Redis source tree, e.g. ``git show 7.0.15:src/redismodule.h``) and the Lua twin
``benchmarks/floor/floor.lua``. One connection sends every request one at a time, as a
proxy's worker does; Redis's CPU comes from ``INFO cpu`` around each step. A whole call
is one admit request and its answer and end as ops of batches of 100 (policer's line
ops; the floors' ``answer`` and ``hangup`` take 100 dialogs a request). Steps:

- ``ping``: one ``PING`` per call (the reference: the ``roundtrip`` flavour's work);
- ``lua floor``: the admit's commands (TIME, HMGET, SET NX GET, HSET, ZADD, HINCRBY,
  XADD) from a Lua function, then its answer (GET, SET) and end (GET, ZREM, SET, XADD;
  HSET and HINCRBY once a batch), fixed arguments, no other logic;
- ``module floor``: the very same commands from C (``RedisModule_Call``);
- ``policer``: policer's library, calls joining ``--memberships`` profiles.

The steps are interleaved within each repeat; the figure is the median over repeats.

    .venv/bin/python -m benchmarks.module_floor --redismodule-h /tmp/redismodule.h
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.instructions import FLOOR_LUA, Traffic
from benchmarks.resp import Conn, pack
from lab.redis_server import RedisServer

SOURCE = Path(__file__).parent / "floor" / "floor.c"
BATCH = 100


def build(header: Path, out: Path) -> Path:
    """floor.so, compiled against ``header``."""
    so = out / "floor.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-std=c99", "-Wall",
                    f"-I{header.parent}", str(SOURCE), "-o", str(so)], check=True)
    return so


def floor_steps(conn: Conn, n: int, prefix: str, admit: Callable[[str], bytes],
                answer: Callable[[list[str]], bytes],
                hangup: Callable[[list[str]], bytes]) -> tuple[float, float]:
    """Redis CPU (µs) per call of ``n`` floor calls: their admits, their answers and
    ends."""
    admits = [admit(prefix)] * n
    t0 = conn.cpu_s()
    dids = [conn.send(a)[7].decode() for a in admits]
    t1 = conn.cpu_s()
    for i in range(0, n, BATCH):
        conn.send(answer(dids[i:i + BATCH]))
    for i in range(0, n, BATCH):
        conn.send(hangup(dids[i:i + BATCH]))
    return (t1 - t0) * 1e6 / n, (conn.cpu_s() - t1) * 1e6 / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redismodule-h", type=Path, required=True,
                   help="redismodule.h of the redis-server's version")
    p.add_argument("--calls", type=int, default=20_000, help="whole calls per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memberships", type=int, default=4, choices=(1, 2, 3, 4, 5, 6))
    p.add_argument("--users", type=int, default=400)
    a = p.parse_args()
    n = a.calls
    with tempfile.TemporaryDirectory(prefix="policer-floor-") as tmp:
        so = build(a.redismodule_h, Path(tmp))
        server = RedisServer(extra_args=["--loadmodule", str(so)]).start()
        conn = Conn(server.port)
        try:
            conn.cmd("FUNCTION", "LOAD", "REPLACE", FLOOR_LUA.read_text())
            traffic = Traffic(server.port, a.memberships, a.users)
            for req in traffic.admits(traffic.calls(n)):  # the users' plans cached
                conn.send(req)

            def ping(r: int) -> tuple[float, float]:
                req = [pack("PING")] * n
                before = conn.cpu_s()
                for q in req:
                    conn.send(q)
                return (conn.cpu_s() - before) * 1e6 / n, 0.0

            def lua(r: int) -> tuple[float, float]:
                return floor_steps(
                    conn, n, f"l{r}-",
                    lambda pre: pack("FCALL", "cmds", 1, "k", "node", pre),
                    lambda ds: pack("FCALL", "answer", 1, "k", *ds),
                    lambda ds: pack("FCALL", "hangup", 1, "k", *ds))

            def module(r: int) -> tuple[float, float]:
                return floor_steps(
                    conn, n, f"m{r}-",
                    lambda pre: pack("FLOOR.CMDS", "node", pre),
                    lambda ds: pack("FLOOR.ANSWER", *ds),
                    lambda ds: pack("FLOOR.HANGUP", *ds))

            def policer(r: int) -> tuple[float, float]:
                cs = traffic.calls(n)
                admits = traffic.admits(cs)
                batches = (traffic.batches(cs, b"+", b"")
                           + traffic.batches(cs, b"-", b" bye"))
                t0 = conn.cpu_s()
                for q in admits:
                    conn.send(q)
                t1 = conn.cpu_s()
                for q in batches:
                    conn.send(q)
                return (t1 - t0) * 1e6 / n, (conn.cpu_s() - t1) * 1e6 / n

            steps = {"ping": ping, "lua floor": lua, "module floor": module,
                     f"policer ({a.memberships} memberships)": policer}
            # per step: admit, answer and end, whole call (µs), whole call x PING
            runs: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in steps}
            for r in range(a.repeats):
                got = {k: f(r) for k, f in steps.items()}
                ref = sum(got["ping"])
                for k, (adm, rest) in got.items():
                    runs[k].append((adm, rest, adm + rest, (adm + rest) / ref))
                print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(
                    f"{k} {run[-1][2]:.1f} µs ({run[-1][3]:.2f}x)" for k, run in runs.items()),
                    flush=True)
            traffic.close()
        finally:
            conn.close()
            server.stop()
    print(f"\nRedis CPU per call, {n} calls a step, medians of {a.repeats} (x PING: the "
          "whole call over the same repeat's PING)")
    print(f"  {'step':<28}{'admit':>8}{'answer+end':>12}{'whole':>8}{'x PING':>8}"
          "  repeats (whole µs)")
    for k, rows in runs.items():
        med = [statistics.median(row[i] for row in rows) for i in range(4)]
        print(f"  {k:<28}{med[0]:>8.1f}{med[1]:>12.1f}{med[2]:>8.1f}{med[3]:>8.2f}  "
              + ", ".join(f"{row[2]:.1f}" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
