"""Load of ``policer bench``: processes placing calls, and the over-admission audit.

Every process places calls of the mix (:mod:`benchmarks.mix`) in a loop, in one of
three modes, which alternate in 0.1 s slices (ABBA order, the same instants in every
process) when a run measures several, so that they see the same machine:

``bare``
    ``FCALL`` of the admit function with the arguments the engine sends
    (:meth:`RedisStore.call_arguments`), packed with hiredis and sent on a raw
    connection of the store's own client (the fewest client steps Python can take);
``redispy``
    the same ``FCALL`` through redis-py's ``execute_command``;
``engine``
    :meth:`Engine.admit` (pack the attributes, one ``FCALL``, turn
    the answer into a Decision, log rejections).

Whatever the mode, a whole call goes on as a proxy's does: each admitted call's
answer (confirm) is queued at once and its end (release) after the process placed
``hold`` more calls; the queue is applied in one ``FCALL`` (:meth:`RedisStore.apply`)
on a connection of its own (a proxy's timer process) when it holds ``batch`` events or
``FLUSH_S`` passed, as a proxy does, and in the load runs also after every quarter of
``hold`` calls placed: a bench call lives a few milliseconds (real calls minutes), so
releases late by 100 ms would keep every count at its max and nearly every call
rejected; applied so, about ``hold`` calls are live at once and the counts press on the
limits (most calls admitted, some rejected). A call's end never goes in the batch of
its answer (the function would coalesce them, which a real call's would not be). The
first process also runs the node's tick once a second.

Audit (every measurement; all must find nothing):

1. every rejection reports the count it saw: a count above the max means the function
   had admitted past it;
2. intervals: an admitted call is surely counted from the moment its admit returned
   until the batch with its release was sent (``perf_counter`` is ``CLOCK_MONOTONIC``,
   one clock for every process). More surely-counted calls on one limited key than its
   effective max means Redis held more than the max at that instant (never a false
   alarm);
3. when the processes stop every limited key's live count is at most its effective max;
   after the last releases every count is back at zero.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.mix import NODE, Template, templates

__all__ = ["FLUSH_S", "Job", "measure", "percentile"]

#: A proxy applies its queued answers and ends at least this often (seconds).
FLUSH_S = 0.1
SLICE_S = 0.1


@dataclass(slots=True)
class Job:
    modes: tuple[str, ...]
    url: str
    namespace: str
    policy: Any
    timeout_ms: int
    templates: list[Template]
    hold: int  # calls this process places before releasing an admitted one
    batch: int  # events per batch call at most
    flush_calls: int  # apply the queue after this many calls placed (0: by time or size)
    warmup: float
    seconds: float  # measured seconds per mode
    rate: float  # calls/s of this process (0: as fast as it can, closed loop)
    tag: str  # unique per measurement: Call-IDs never repeat


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def _worker(job: Job, index: int, barrier: Any, start: Any, out: Any) -> None:
    try:
        out.put(_work(job, index, barrier, start))
    except BaseException as e:  # the parent must hear about it, never hang
        with contextlib.suppress(Exception):
            barrier.abort()
        out.put({"error": f"{type(e).__name__}: {e}"})


def _work(job: Job, index: int, barrier: Any, start: Any) -> dict[str, Any]:
    from hiredis import pack_command

    from policer.call import Call
    from policer.engine import Engine
    from policer.store.base import Op
    from policer.store.redis_store import RedisStore

    policy = job.policy
    store = RedisStore(job.url, job.namespace, timeout_ms=job.timeout_ms, policy=policy)
    engine = Engine(policy, store, node=NODE)
    # the proxy's timer process: applies the queued events, ticks (its own connection)
    timer = RedisStore(job.url, job.namespace, timeout_ms=max(job.timeout_ms, 2000),
                       policy=policy)
    ticker = Engine(policy, timer, node=NODE, lease=True) if index == 0 else None
    head = ("FCALL", store.library.function("admit"), 1, store.library.prefix)
    client = store.client
    raw: Any = client.connection_pool.make_connection()
    raw.connect()
    admit, perf = engine.admit, time.perf_counter
    execute: Any = client.execute_command
    modes, templates_ = job.modes, job.templates
    n_modes = len(modes)
    bare_at = modes.index("bare") if "bare" in modes else -1
    redispy_at = modes.index("redispy") if "redispy" in modes else -1
    total = job.seconds * n_modes
    gap = 1.0 / job.rate if job.rate > 0 else 0.0
    dialog_ms = policy.timeouts.dialog_ms
    order = list(range(len(templates_)))
    random.Random(index).shuffle(order)

    lat = [array("d") for _ in modes]
    admitted = [0] * n_modes
    rejected = [0] * n_modes
    fallbacks = [0] * n_modes
    over_seen = 0
    ia, ir, it = array("d"), array("d"), array("i")  # audit: admitted, release sent, template
    # (release at seq, did, admitted at, template, batches applied when admitted)
    held: deque[tuple[int, str, float, int, int]] = deque()
    queue: list[tuple[Op, float, int]] = []  # (event, admitted at (releases), template)
    flushes = [0]

    def flush() -> None:
        flushes[0] += 1
        for i in range(0, len(queue), job.batch):
            chunk = queue[i:i + job.batch]
            sent = perf()
            timer.apply([op for op, _, _ in chunk])
            for op, ta, ti in chunk:
                if op.kind == "release" and ta != math.inf:
                    ia.append(ta)
                    ir.append(sent)
                    it.append(ti)
        queue.clear()

    seq = 0
    gc.collect()
    gc.freeze()  # a long-running proxy's start-up objects are not collected again
    if barrier.wait(timeout=60) == 0:
        start.value = perf() + job.warmup
    barrier.wait(timeout=60)
    t_start = start.value
    t_begin = t_start - job.warmup
    t_end = t_start + total
    next_flush = t_begin + FLUSH_S
    next_tick = t_begin
    while True:
        now = perf()
        if now >= t_end:
            break
        if gap:
            due = t_begin + seq * gap
            if now < due:
                time.sleep(due - now)
                now = perf()
        if now >= next_flush or len(queue) >= job.batch or (
                job.flush_calls and seq % job.flush_calls == 0):
            flush()
            next_flush = now + FLUSH_S
        if ticker is not None and now >= next_tick:
            ticker.tick()
            next_tick = now + 1.0
        while held and held[0][0] <= seq:
            _, did, ta, ti, gen = held.popleft()
            if gen == flushes[0]:  # its answer is still queued: a call's answer and end
                flush()  # in one batch cost Redis less than a real (minutes-long) call
            queue.append((Op("release", did, "bye"), ta, ti))
        if now < t_start:
            m = seq % n_modes
        else:
            s_i = int((now - t_start) / SLICE_S)
            pos = s_i % n_modes
            m = pos if (s_i // n_modes) % 2 == 0 else n_modes - 1 - pos
        ti = order[seq % len(order)]
        tpl = templates_[ti]
        call_id = job.tag + "-" + str(index) + "-" + str(seq)
        seq += 1
        did = call_id + ";tag"
        fell = False
        if m in (bare_at, redispy_at):
            command = (*head, *tpl.arguments(call_id))
            if m == bare_at:
                t0 = perf()
                raw.send_packed_command([pack_command(command)], check_health=False)
                r = raw.read_response()
            else:
                t0 = perf()
                r = execute(*command)
            t1 = perf()
            ok = r[0] == 1
            if not ok and int(r[5]) > int(r[6]):
                over_seen += int(r[5]) - int(r[6])
        else:
            call = Call(call_id, "tag", **tpl.call)
            t0 = perf()
            d = admit(call)
            t1 = perf()
            ok, fell = d.admitted, d.fallback
            if not ok and not fell and d.count > d.max:
                over_seen += d.count - d.max
        if t0 >= t_start:
            lat[m].append(t1 - t0)
            if fell:
                fallbacks[m] += 1
            elif ok:
                admitted[m] += 1
            else:
                rejected[m] += 1
        if ok:
            queue.append((Op("confirm", did, dialog_ms), math.inf, ti))
            # a fallback's call may or may not be counted: never audited, released anyway
            held.append((seq + job.hold, did, math.inf if fell else t1, ti, flushes[0]))
    gc.unfreeze()
    flush()
    for _, _, ta, ti, _ in held:
        ia.append(ta)
        ir.append(math.inf)
        it.append(ti)
    raw.disconnect()
    return {
        "modes": {mode: {"lat": lat[i].tobytes(), "admitted": admitted[i],
                         "rejected": rejected[i], "fallbacks": fallbacks[i],
                         "elapsed": job.seconds}
                  for i, mode in enumerate(modes)},
        "over_seen": over_seen, "ia": ia.tobytes(), "ir": ir.tobytes(), "it": it.tobytes(),
        "left": [did for _, did, _, _, _ in held],
    }


def measure(bench: Any, modes: tuple[str, ...], processes: int, *, rate: float = 0.0,
            hold: int | None = None, batch: int | None = None, by_time: bool = False,
            extra_s: float = 0.0, policy: Any = None,
            observe: Callable[[Any, float, float], dict[str, Any]] | None = None,
            ) -> dict[str, Any]:
    """One run of ``processes`` processes in ``modes`` (interleaved). ``rate``: calls/s
    of all processes together (0: closed loop); ``hold``: calls held by all processes
    together (default --hold); ``batch``: events per batch call at most (default
    --batch); ``by_time``: apply the queue only when it is full or ``FLUSH_S`` passed, as
    a proxy does (default: also after every quarter of a process's ``hold``, see
    below); ``policy``: another than the bench's. ``observe(store, t_start, t_end)`` runs
    in this process
    while they place calls (``perf_counter`` times of the measured window; the
    processes go on for ``extra_s`` seconds after it) and its result is returned under
    ``"observed"``. Returns ``{mode: figures, ..., "observed": ...}``."""
    from policer.engine import Engine
    from policer.store.redis_store import RedisStore

    args = bench.args
    policy = policy or bench.policy
    namespace = bench.namespace()
    store = RedisStore(bench.url, namespace, timeout_ms=30_000, policy=policy)
    store.load(policy)
    mix = templates(policy, store, Engine(policy, store, node=NODE))
    hold_all = args.hold if hold is None else hold
    hold_one = max(1, math.ceil(hold_all / processes))
    job = Job(modes, bench.url, namespace, policy, bench.timeout_ms, mix,
              hold=hold_one, batch=batch or args.batch,
              flush_calls=0 if by_time else max(1, math.ceil(hold_one / 4)),
              warmup=args.warmup, seconds=args.seconds + extra_s / len(modes),
              rate=rate / processes, tag=namespace)
    ctx = bench.ctx
    barrier = ctx.Barrier(processes)
    start = ctx.Value("d", 0.0)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(job, i, barrier, start, out), daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    observed: dict[str, Any] | None = None
    try:
        if observe is not None:
            deadline = time.monotonic() + 60
            while start.value == 0.0 and time.monotonic() < deadline:
                time.sleep(0.01)
            if start.value:
                observed = observe(store, start.value, start.value + args.seconds)
        timeout = args.warmup + job.seconds * len(modes) + 120
        results = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"bench worker failed: {errors[0]}")
    audit = _audit(bench, store, mix, results)
    bench.drop_namespace(namespace)
    figures: dict[str, Any] = {}
    for mode in modes:
        rs = [r["modes"][mode] for r in results]
        lat = array("d")
        for r in rs:
            lat.frombytes(r["lat"])
        samples = sorted(lat)
        decided = sum(r["admitted"] + r["rejected"] + r["fallbacks"] for r in rs)
        admitted = sum(r["admitted"] for r in rs)
        figures[mode] = {
            "mode": mode,
            "processes": processes,
            "interleaved_with": [m for m in modes if m != mode],
            "rate_target_per_s": round(rate) if rate else None,
            "decisions": decided,
            "decisions_per_s": round(sum((r["admitted"] + r["rejected"] + r["fallbacks"])
                                         / r["elapsed"] for r in rs)),
            "admitted_share": round(admitted / decided, 3) if decided else 0.0,
            "fallbacks": sum(r["fallbacks"] for r in rs),
            "p50_us": round(percentile(samples, 0.50) * 1e6, 1),
            "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
            "p999_us": round(percentile(samples, 0.999) * 1e6, 1),
            "max_us": round(samples[-1] * 1e6, 1) if samples else math.nan,
            **audit,
        }
    figures["observed"] = observed
    return figures


def _audit(bench: Any, store: Any, mix: list[Template],
           results: list[dict[str, Any]]) -> dict[str, Any]:
    from policer.store.base import Op

    over_seen = sum(r["over_seen"] for r in results)
    # 2. intervals: surely-counted ordinary calls per limited key
    events: dict[str, list[tuple[float, int]]] = {}
    effective: dict[str, int] = {}
    for r in results:
        ia, ir, it = array("d"), array("d"), array("i")
        ia.frombytes(r["ia"])
        ir.frombytes(r["ir"])
        it.frombytes(r["it"])
        for ta, tr, ti in zip(ia, ir, it, strict=True):
            if ta == math.inf:
                continue
            for key, mx in mix[ti].audited:
                ev = events.setdefault(key, [])
                ev.append((ta, 1))
                ev.append((tr, -1))
                effective[key] = mx
    over_interval = 0
    flagged: list[dict[str, Any]] = []
    peak_share = 0.0
    for key, ev in events.items():
        ev.sort()  # at equal times a release (-1) sorts before an admission (+1)
        live = 0
        mx = effective[key]
        for t, step in ev:
            live += step
            if step > 0 and live > mx:
                over_interval += 1
                if len(flagged) < 5:
                    flagged.append({"key": key, "live": live, "max": mx, "at": t})
            if mx > 0:
                peak_share = max(peak_share, live / mx)
    # 3. live counts at most their max; after the last releases, nothing left
    keys = sorted(effective)
    sizes = store.sizes(keys) if keys else []
    over_final = sum(max(0, n - effective[k]) for k, n in zip(keys, sizes, strict=True))
    left = [did for r in results for did in r["left"]]
    for i in range(0, len(left), 200):
        store.apply([Op("release", did, "bye") for did in left[i:i + 200]])
    counts = bench.client.hgetall(store.keys.counts)
    leaked = sum(int(v) for f, v in counts.items()
                 if not f.startswith(("L|", "T|", "F|", "Fs|", "Fl|", "B|", "#", "!", "^")))
    leaked += store.stats()["active"]
    return {
        "over_admissions": over_seen + over_interval + over_final,
        "audit": {"rejections_over_max": over_seen, "interval_over_max": over_interval,
                  "final_over_max": over_final, "leaked_after_release": leaked,
                  "audited_keys": len(keys), "flagged": flagged,
                  "peak_surely_live_over_max": round(peak_share, 3)},
    }
