"""Many processes at once against one Redis (the race tests): each runs ``target(url,
namespace, worker, per_worker, barrier, out)`` and puts its result on ``out``; the
barrier starts them together."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

__all__ = ["PROCESSES", "run_workers"]

#: processes of a race
PROCESSES = 16


def run_workers(target: Any, url: str, namespace: str, per_worker: int,
                processes: int = PROCESSES, timeout: float = 180) -> list[Any]:
    """Every worker's result (forked processes, started together); each must exit 0."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, namespace, w, per_worker, barrier, out))
             for w in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results
