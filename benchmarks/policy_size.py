#!/usr/bin/env python3
"""Benchmark of big policies: ``policer check`` time by the number of prefixes of one
class, and what a policy of that size costs the other steps that read it.

    .venv/bin/python benchmarks/policy_size.py          # the figures of docs/benchmarks.md
    .venv/bin/python benchmarks/policy_size.py --sizes 5000,40000 --runs 3

What it measures, for every size (default 5,000, 40,000, 125,000 and 1,000,000
prefixes, a premium-rate list of 8 to 12 digits starting with 0):

- **check**: the wall time of ``python -m policer check FILE`` (a new process: start-up,
  imports, reading, validation), the median of ``--runs`` runs, the sizes interleaved
  run by run; for the class written in the YAML file (``prefixes: [...]``, flow style,
  so that a million fit in the 16 MiB bound) and for the same list in a
  ``prefixes_file``; then the ratios of 8x the prefixes (40,000 / 5,000 and
  1,000,000 / 125,000), which linear work keeps well under 8 (the target: at most 6);
- **phases**, in this process: parse (``load_policy``), compile (the Lua library),
  the Python classifier's build, the native flavour's fallback htables, and with a
  private ``redis-server`` (unless ``--no-redis``): ``FUNCTION LOAD`` of the library
  (client wall time and Redis's own usec from INFO commandstats), Redis's function VM
  memory, and the cost of a call in Redis (usec per call from INFO commandstats: the
  read function's ``info``, which classifies nothing, a dry-run admit and an admit)
  and of a classification in Python (per number), over numbers under the list and
  numbers of no prefix. (A big library makes every call of the functions VM dearer:
  Redis steps Lua's garbage collector every 50 calls, over a heap that holds every
  prefix as a string.)

Everything is bounded: a few runs of a few seconds per size; the files are written to
a temporary folder removed at the end, the Redis stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.redis_server import RedisServer  # noqa: E402
from policer.adapters.kamailio_native import fallback_tables  # noqa: E402
from policer.call import Call  # noqa: E402
from policer.classify import Classifier  # noqa: E402
from policer.compile import _compile  # noqa: E402
from policer.policy import load_policy  # noqa: E402
from policer.store import RedisStore  # noqa: E402

SIZES = (5_000, 40_000, 125_000, 1_000_000)
HEAD = """version: 1
namespace: {ns}
classes:
  emergency: {{numbers: ["110", "112"]}}
  premium:
"""
TAIL = """  national: {prefixes: ["0"]}
  local: {default: true}
profiles:
  total: {}
  premium: {when: {class: premium}}
limits:
  total: {max: 1000}
  premium: {max: 0, reject: {code: 403, reason: "Premium Numbers Barred"}}
"""


def prefixes(n: int) -> list[str]:
    """``n`` distinct prefixes of 8 to 12 digits (the same for a size, run after run)."""
    rnd = random.Random(n)
    out: set[str] = set()
    while len(out) < n:
        out.add("0" + str(rnd.randrange(10**7, 10**11)))
    return sorted(out)


def write_policies(folder: Path, n: int) -> tuple[Path, Path]:
    """The YAML form (the list in the file) and the list-file form of one size."""
    items = prefixes(n)
    inline = folder / f"inline-{n}.yaml"
    with inline.open("w") as f:
        f.write(HEAD.format(ns=f"bench{n}"))
        f.write("    prefixes: [\n")
        for i in range(0, len(items), 16):
            f.write("      " + ", ".join(items[i:i + 16]) + ",\n")
        f.write("    ]\n")
        f.write(TAIL)
    (folder / f"list-{n}.txt").write_text("# premium-rate prefixes\n" + "\n".join(items) + "\n")
    listed = folder / f"file-{n}.yaml"
    listed.write_text(HEAD.format(ns=f"bench{n}") + f"    prefixes_file: list-{n}.txt\n"
                      + TAIL)
    return inline, listed


def check_time(path: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "policer", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"policer check {path} failed:\n{proc.stderr}")
    return elapsed


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def commandstat(client: Any, name: str) -> tuple[int, int]:
    stats = client.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def phases(path: Path, n: int, redis_url: str | None, numbers: int) -> dict[str, Any]:
    """The in-process phases of one size (the list-file form)."""
    gc.collect()
    out: dict[str, Any] = {}
    out["parse_s"], policy = timed(lambda: load_policy(path))
    out["compile_s"], library = timed(lambda: _compile(policy, policy.namespace))
    out["library_mb"] = round(len(library.text) / 1e6, 1)
    out["classifier_s"], classifier = timed(lambda: Classifier(policy))
    out["fallback_s"], tables = timed(lambda: fallback_tables(policy))
    out["fallback_entries"] = len(tables["policer_class"])
    rnd = random.Random(1)
    listed = rnd.sample(policy.classes[1].prefixes, min(numbers, n))
    sample = [p + "123" for p in listed] + [f"5{rnd.randrange(10**6, 10**7)}"
                                            for _ in range(len(listed))]
    t, classes = timed(lambda: [classifier.number_class(x) for x in sample])
    assert classes[:len(listed)] == ["premium"] * len(listed)
    out["python_classify_us"] = round(t / len(sample) * 1e6, 2)
    if redis_url is None:
        return out
    store = RedisStore(redis_url, policy.namespace, timeout_ms=60_000, policy=policy)
    try:
        client: Any = store.client
        client.execute_command("FUNCTION", "FLUSH")
        before = commandstat(client, "function|load")
        out["function_load_s"], _ = timed(lambda: store.load(policy))
        after = commandstat(client, "function|load")
        out["function_load_redis_ms"] = round((after[1] - before[1]) / 1000, 1)
        memory = client.info("memory")
        out["redis_functions_vm_mb"] = round(int(memory.get("used_memory_vm_functions", 0))
                                             / 1e6, 1)
        calls = [Call.from_raw(f"bench-{i}", "t", from_user=f"u{i}", ruri_user=x)
                 for i, x in enumerate(sample)]
        store.explain_call(calls[0])  # connected, warm
        for key, run, command in (
                ("redis_info_us", lambda c: store.loaded_hash(), "fcall_ro"),
                ("redis_admit_dry_run_us", store.explain_call, "fcall"),
                ("redis_admit_us", lambda c: store.admit_call(c, "bench"), "fcall")):
            before = commandstat(client, command)
            for c in calls:
                run(c)
            after = commandstat(client, command)
            out[key] = round((after[1] - before[1]) / (after[0] - before[0]), 1)
        client.execute_command("FUNCTION", "FLUSH")
        client.flushall()
    finally:
        store.close()
    return out


@contextlib.contextmanager
def redis_server(enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    with RedisServer() as server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="prefix counts, comma-separated (default %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="check runs per size and form")
    p.add_argument("--numbers", type=int, default=2000,
                   help="numbers classified per size (half under the list)")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis phases")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "check_s": {}, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="policer-bench-") as tmp:
        folder = Path(tmp)
        files = {n: write_policies(folder, n) for n in sizes}
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.runs):  # interleaved: a busy moment spreads over every size
            for n in sizes:
                for form, path in zip(("yaml", "file"), files[n], strict=True):
                    times.setdefault((form, n), []).append(check_time(path))
        for (form, n), ts in times.items():
            report["check_s"].setdefault(form, {})[n] = round(statistics.median(ts), 3)
        with redis_server(not args.no_redis) as url:
            if url is not None:
                version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                         text=True).stdout.split()[2]
                report["machine"]["redis"] = version
            for n in sizes:
                report["phases"][n] = phases(files[n][1], n, url, args.numbers)
    ratios = {}
    for form, by_size in report["check_s"].items():
        for small in sizes:
            if small * 8 in by_size:
                ratios[f"{form} {small * 8}/{small}"] = round(by_size[small * 8]
                                                              / by_size[small], 2)
    report["ratios_8x"] = ratios
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"machine: {m['cpus']} CPUs, Python {m['python']}, redis-server "
          f"{m.get('redis', '-')}, {m['platform']}")
    print(f"policer check, median of {args.runs} runs (s):")
    print("  prefixes     " + "  ".join(f"{n:>10}" for n in sizes))
    for form, by_size in report["check_s"].items():
        print(f"  {form:<12} " + "  ".join(f"{by_size[n]:>10.3f}" for n in sizes))
    print("8x the prefixes, time ratio: " + ", ".join(f"{k}: {v}" for k, v in ratios.items()))
    keys = sorted({k for ph in report["phases"].values() for k in ph})
    print("phases (list-file form):")
    print("  " + " " * 24 + "  ".join(f"{n:>10}" for n in sizes))
    for k in keys:
        print(f"  {k:<24}" + "  ".join(
            f"{report['phases'][n].get(k, '-'):>10}" if not isinstance(
                report["phases"][n].get(k), float) else f"{report['phases'][n][k]:>10.3f}"
            for n in sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
