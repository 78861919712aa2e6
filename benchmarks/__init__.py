"""``policer bench``: how fast admission runs against a real Redis, what it costs
Redis, and whether it stays exact under load.

Every decision is one ``FCALL`` of the policy's compiled function library. One run
measures, with the same call mix everywhere (:mod:`benchmarks.mix`) and whole
calls (admit; answer and end queued and applied in batches, as a proxy does;
:mod:`benchmarks.load`):

- **engine vs bare** (1 and 8 processes, interleaved in 0.1 s slices): :meth:`Engine.admit`
  against a bare ``FCALL`` of the same function with the same arguments from the same
  client (hiredis-packed on a raw connection of the store's redis-py client; also
  through redis-py's ``execute_command``): ``ratio_p50`` = engine p50 / bare p50;
- **engine** from each ``--processes`` count: decisions/s, p50/p99/p99.9 latency, and
  8 processes paced below saturation (``--paced``);
- **Redis CPU per call**: ``--cpu-processes`` processes paced at ``--cpu-rate`` calls/s,
  with the policy's limits out of reach (every INVITE a whole call); Redis's own
  counters (INFO cpu ``used_cpu_sys + used_cpu_user``, INFO commandstats) over the
  window, divided by the INVITEs decided in it; a SLOWLOG sample splits the function
  time between admit, batch and tick;
- **expiry**: ``--expiry-members`` members (dialog deadlines) expire together: the
  slowest admit inside Redis while the tick's bounded sweeps clear them, and how long
  each tick call takes;
- **counting**: admit time inside Redis with 100 vs ``--counting-members`` live members;
- **ceiling**: ``redis-benchmark -c 8`` calling the same function (C clients);

and audits every load run for over-admissions (must be 0). Nothing is timed in the
test suite: the figures live in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from benchmarks.load import FLUSH_S, measure
from benchmarks.redis_figures import ceiling, counting, cpu_observer, expiry
from benchmarks.report import human

__all__ = ["add_arguments", "run"]

DEFAULT_POLICY = "policies/example.yaml"
#: The bare FCALL is also measured from this many processes (bare_8_per_s).
BARE_PROCESSES = 8
#: The Redis CPU run raises every max of the policy to this: the same profiles, keys and
#: checks, and every INVITE a whole call (admitted, answered, ended).
UNREACHED = 1_000_000_000
#: Events per batch call at most in the Redis CPU run (the engine's batch); the queue
#: is applied every 0.1 s or when it holds this many, as a proxy does.
CPU_BATCH = 200
#: Seconds of SLOWLOG after the Redis CPU window (split by function).
CPU_SAMPLE_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", metavar="URL", default=None,
                        help="Redis to measure against (default: start a private "
                             "redis-server and stop it afterwards). Only keys and function "
                             "libraries of bench namespaces are written, and deleted.")
    parser.add_argument("--policy", metavar="FILE", default=DEFAULT_POLICY,
                        help="policy whose limits the call mix exercises "
                             f"(default {DEFAULT_POLICY})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="measured seconds per measurement (default 4)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each measurement (default 0.5)")
    parser.add_argument("--processes", default="1,2,4,8",
                        help="engine process counts (default 1,2,4,8)")
    parser.add_argument("--hold", type=int, default=100,
                        help="calls placed (all processes together) before an admitted "
                             "call is released again: sets how far the mix presses on "
                             "the limits (default 100)")
    parser.add_argument("--batch", type=int, default=50,
                        help="answers and ends per batch call at most in the load runs "
                             "(default 50)")
    parser.add_argument("--timeout-ms", type=int, default=None,
                        help="store timeout (default: the policy's store_timeout)")
    parser.add_argument("--cpu-rate", type=float, default=4000,
                        help="calls/s offered for the Redis CPU figure (default 4000, the "
                             "Kamailio benchmark's rate; 0 skips it)")
    parser.add_argument("--cpu-processes", type=int, default=2,
                        help="processes placing those calls (default 2)")
    parser.add_argument("--expiry-members", type=int, default=300_000,
                        help="members (dialog deadlines in every key of a call) that "
                             "expire together in the expiry check (default 300000; 0 "
                             "skips the expiry and counting checks)")
    parser.add_argument("--counting-members", type=int, default=50_000,
                        help="live members in the counting check (default 50000)")
    parser.add_argument("--paced", type=float, default=0.5,
                        help="also run 8 engine processes paced at this share of their "
                             "closed-loop rate, for latency below saturation (default 0.5; "
                             "0 skips)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the redis-benchmark ceiling")
    parser.add_argument("--log-level", default="info",
                        help="log level inside the benchmark processes (default info, as "
                             "deployed: every rejection is logged; the lines go to "
                             "/dev/null at info or debug)")


def run(args: argparse.Namespace) -> int:
    try:
        counts = tuple(int(x) for x in str(args.processes).split(",") if x.strip())
    except ValueError:
        print("policer bench: --processes takes numbers like 1,2,4,8", file=sys.stderr)
        return 2
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.hold < 1 or \
            args.batch < 1 or args.cpu_processes < 1:
        print("policer bench: --processes, --seconds, --hold, --batch and --cpu-processes "
              "must be positive", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)

    from lab.redis_server import RedisServer, RedisServerError
    from policer.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
    except (OSError, PolicyError) as e:
        print(f"policer bench: {e}", file=sys.stderr)
        return 2
    server: RedisServer | None = None
    url = args.redis
    if url is None:
        try:
            server = RedisServer().start()
        except RedisServerError as e:
            print(f"policer bench: {e}", file=sys.stderr)
            return 2
        url = server.url
    try:
        result = Bench(args, policy, url, owned=server is not None, counts=counts).run_all()
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


def _configure_logging(level: str) -> None:
    """Bench processes log at ``level``; at info or below the lines go to /dev/null."""
    from policer import log

    os.environ["POLICER_LOG_LEVEL"] = level
    if level.lower() in ("debug", "info"):
        sink = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        log.configure(level=level, fmt="json", stream=sink)
    else:
        log.configure(level=level)


class Bench:
    """What every measurement shares: the arguments, the policy, Redis."""

    def __init__(self, args: argparse.Namespace, policy: Any, url: str, *, owned: bool,
                 counts: tuple[int, ...]) -> None:
        from policer.store.redis_store import RedisStore

        self.args = args
        self.policy = policy
        self.url = url
        self.owned = owned
        self.counts = counts
        self.timeout_ms = args.timeout_ms or policy.store_timeout_ms
        self.run_id = f"bench{os.getpid()}x{int(time.time()) % 100000}"
        self.n = 0
        self.admin = RedisStore(url, self.run_id + "-admin", timeout_ms=30_000)
        self.client: Any = self.admin.client
        self.ctx = mp.get_context("fork")

    def namespace(self) -> str:
        self.n += 1
        return f"{self.run_id}-{self.n}"

    def drop_namespace(self, namespace: str) -> None:
        """Delete a bench namespace's keys and function library."""
        from policer.compile import function_suffix
        from policer.store.keys import Keys

        if self.owned:
            self.client.flushall(asynchronous=True)
            self.client.execute_command("FUNCTION", "FLUSH", "ASYNC")
            return
        with contextlib.suppress(Exception):  # (a library never loaded)
            self.client.execute_command("FUNCTION", "DELETE",
                                        f"policer_{function_suffix(namespace)}")
        pattern = Keys(namespace).prefix.replace("{", "\\{").replace("}", "\\}") + "*"
        batch: list[str] = []
        for key in self.client.scan_iter(match=pattern, count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    def benchmark_target(self) -> list[str]:
        """redis-benchmark's arguments naming the Redis under test."""
        if self.url.startswith("unix://"):
            return ["-s", self.url[len("unix://"):].split("?", 1)[0]]
        return ["-u", self.url]

    def run_all(self) -> dict[str, Any]:
        args = self.args
        t0 = time.monotonic()
        load_before = os.getloadavg()
        info = self.client.info("server")
        engine: dict[str, dict[str, Any]] = {}
        bare: dict[str, dict[str, Any]] = {}
        redispy: dict[str, dict[str, Any]] = {}
        runs: list[dict[str, Any]] = []  # one audit per run (interleaved modes share it)
        for p in sorted(set(self.counts) | {1, BARE_PROCESSES}):
            if p in (1, BARE_PROCESSES):
                modes = ("bare", "redispy", "engine") if p in self.counts else (
                    "bare", "redispy")
                r = measure(self, modes, p)
                bare[str(p)], redispy[str(p)] = r["bare"], r["redispy"]
                if "engine" in r:
                    engine[str(p)] = r["engine"]
                runs.append(r["bare"])
            else:
                engine[str(p)] = measure(self, ("engine",), p)["engine"]
                runs.append(engine[str(p)])
        e1: Any = engine.get("1")
        e8: Any = engine.get("8")
        paced: Any = None
        if e8 and args.paced > 0:
            paced = measure(self, ("engine",), 8, rate=e8["decisions_per_s"] * args.paced)[
                "engine"]
            runs.append(paced)
        cpu: Any = None
        if args.cpu_rate > 0:
            # calls live 0.3 s: each one's end goes in a later batch than its answer
            hold = max(args.hold, math.ceil(args.cpu_rate * 3 * FLUSH_S))
            r = measure(self, ("engine",), args.cpu_processes, rate=args.cpu_rate, hold=hold,
                        batch=CPU_BATCH, by_time=True, extra_s=CPU_SAMPLE_S,
                        policy=_unlimited(self.policy),
                        observe=cpu_observer(self, CPU_SAMPLE_S))
            runs.append(r["engine"])
            cpu = {**(r["observed"] or {}), "processes": args.cpu_processes,
                   "rate_target_per_s": args.cpu_rate, "hold": hold,
                   "admitted_share": r["engine"]["admitted_share"],
                   "client_p50_us": r["engine"]["p50_us"], "client_p99_us": r["engine"]["p99_us"]}
        ex: Any = None
        co: Any = None
        if args.expiry_members > 0:
            try:
                ex = expiry(self, args.expiry_members)
                co = counting(self, args.counting_members)
            except Exception as e:  # e.g. CONFIG disabled on a managed Redis
                ex = {"error": f"{type(e).__name__}: {e}"}
        b1, b8 = bare["1"], bare[str(BARE_PROCESSES)]
        ceil: dict[str, Any] = {"skipped": True} if args.no_ceiling else ceiling(
            self, b8["decisions_per_s"])
        cpu_us = cpu.get("us_per_admitted_call") if cpu else None
        result: dict[str, Any] = {
            "ratio_p50": round(e1["p50_us"] / b1["p50_us"], 3) if e1 else None,
            "ratio_p50_redispy": round(e1["p50_us"] / redispy["1"]["p50_us"], 3) if e1 else None,
            "bare_8_per_s": b8["decisions_per_s"],
            "ceiling_per_s": ceil.get("per_s"),
            "redis_us_per_call": cpu_us,
            "over_admissions": sum(r["over_admissions"] for r in runs),
            "processes": {p: {k: r[k] for k in ("decisions_per_s", "p50_us", "p99_us",
                                                   "p999_us")}
                          for p, r in engine.items()},
            "targets": {
                "ratio_p50_le_1_2": bool(e1) and e1["p50_us"] / b1["p50_us"] <= 1.2,
                "p99_8_le_1ms": bool(e8) and e8["p99_us"] <= 1000,
                "p99_8_paced_le_1ms": bool(paced) and paced["p99_us"] <= 1000,
                "expiry_le_1ms": bool(ex) and (ex.get("max_us_least_disturbed") or 1e9) <= 1000,
                "redis_cpu_le_40us": cpu_us is not None and cpu_us <= 40,
            },
            "bare": bare,
            "bare_redispy": redispy,
            "engine": engine,
            "paced_8": paced,
            "redis_cpu": cpu,
            "expiry": ex,
            "counting": co,
            "ceiling": ceil,
            "setup": {
                "redis": self.url if not self.owned else "private redis-server",
                "redis_version": info.get("redis_version"),
                "policy": str(args.policy),
                "seconds": args.seconds, "warmup": args.warmup, "hold": args.hold,
                "batch": args.batch, "store_timeout_ms": self.timeout_ms,
                "log_level": args.log_level,
                "python": platform.python_version(),
                "nproc": os.cpu_count(),
                "cpu": _cpu_model(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "total_s": round(time.monotonic() - t0, 1),
                "command": "policer bench " + " ".join(sys.argv[1:]),
            },
        }
        self.admin.close()
        return result


def _unlimited(policy: Any) -> Any:
    """The policy with every max out of reach (profiles, keys and checks unchanged)."""
    limits = {name: replace(lim, max=UNREACHED) for name, lim in policy.limits.items()}
    return replace(policy, limits=MappingProxyType(limits))


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
