"""What one egress attempt costs Redis (issue 18), against a PING and against the floor
of any function call, measured in the same run on a lone Redis.

One connection sends every request one at a time, as a proxy's worker does; Redis's CPU
comes from ``INFO cpu`` around each step (so a step's figure holds the request's
reading, parsing, reply writing and event loop, as the bench's do). Steps, interleaved
within each repeat:

- ``ping``: one ``PING`` a request (the reference);
- ``fcall noop``: ``FCALL`` of a function that returns 1: the floor of any function call;
- ``egress join``: ``policer_egress_S`` of a live dialog to its first gateway (the
  dialogs are admitted before the step, unmeasured);
- ``egress move``: the same dialogs to another gateway (a failover: the first gateway is
  left, the second joined).

The policy is deploy/kamailio/bench_trunk.yaml's (``total`` and ``trunk: {value:
gateway}``, caps nothing reaches). The figure is the median over repeats.

    .venv/bin/python -m benchmarks.egress_cost
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.resp import Conn, pack
from lab.redis_server import RedisServer
from policer.call import Call
from policer.compile import compile_policy
from policer.policy import load_policy
from policer.store import RedisStore

POLICY = Path(__file__).resolve().parents[1] / "deploy" / "kamailio" / "bench_trunk.yaml"
NOOP = "#!lua name=noop\nredis.register_function('noop', function() return 1 end)\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20_000, help="requests per step")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    n = a.calls
    policy = load_policy(POLICY)
    library = compile_policy(policy)
    server = RedisServer(extra_args=["--appendonly", "no", "--save", ""]).start()
    conn = Conn(server.port)
    store = RedisStore(server.url, policy.namespace, 2000, policy=policy)
    try:
        store.load(policy)
        conn.cmd("FUNCTION", "LOAD", "REPLACE", NOOP)
        egress = library.function("egress")

        def timed(reqs: list[bytes]) -> float:
            before = conn.cpu_s()
            for q in reqs:
                conn.send(q)
            return (conn.cpu_s() - before) * 1e6 / len(reqs)

        runs: dict[str, list[float]] = {k: [] for k in
                                        ("ping", "fcall noop", "egress join", "egress move")}
        for r in range(a.repeats):
            calls = [Call.from_raw(f"e{r}-{i}", "t", ruri_user="5551000") for i in range(n)]
            dids = [d.dialog_id for d in store.admit_calls(calls, "bench")  # type: ignore[union-attr]
                    ]
            got = {
                "ping": timed([pack("PING")] * n),
                "fcall noop": timed([pack("FCALL", "noop", 0)] * n),
                "egress join": timed([pack("FCALL", egress, 1, library.prefix, d,
                                            "10.0.0.1:5060", 0) for d in dids]),
                "egress move": timed([pack("FCALL", egress, 1, library.prefix, d,
                                            "10.0.0.2:5060", 0) for d in dids]),
            }
            for k, v in got.items():
                runs[k].append(v)
            for d in dids:
                store.release(d, "bye")
            ref = got["ping"]
            print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(
                f"{k} {v:.1f} µs ({v / ref:.2f}x)" for k, v in got.items()), flush=True)
    finally:
        store.close()
        conn.close()
        server.stop()
    print(f"\nRedis CPU per request, {n} requests a step, medians of {a.repeats} (x PING: "
          "over the same repeat's PING)")
    for k, vs in runs.items():
        ratios = [v / p for v, p in zip(vs, runs["ping"], strict=True)]
        print(f"  {k:<14}{statistics.median(vs):>8.1f} µs {statistics.median(ratios):>6.2f}x"
              f"  ({', '.join(f'{v:.1f}' for v in vs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
