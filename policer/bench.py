"""``policer bench``: how fast admission runs against a real Redis, and whether it
stays exact under load.

One run measures, with the same call mix everywhere:

(a) **bare**: ``admit.lua`` called with a raw ``EVALSHA`` through the store's own
    redis-py client (no engine code), with exactly the KEYS/ARGV the engine
    sends (:meth:`RedisStore.admit_arguments`), from one client and from
    8 processes;
(b) **engine**: :meth:`Engine.admit` from 1, 2, 4 and 8 processes: decisions/s,
    p50/p99/p99.9 latency (one ``perf_counter`` sample per call) and
    over-admissions (must be 0);
(c) **ceiling**: ``redis-benchmark -c 8`` running the same script with the same
    KEYS/ARGV shape (C clients: what Redis itself can do with this script);

and two properties of the store that must hold at any size:

- **expiry**: 50,000 members of every key of a call expiring together: the
  slowest admit script (Redis ``SLOWLOG``, microseconds inside Redis) while the
  bounded sweep clears them;
- **counting**: admit script time with 100 vs 50,000 live members in a profile
  (``ZCOUNT`` is O(log n)).

Load is steady: every admitted call is released again (raw ``release.lua``,
identical in bare and engine runs) after the process has placed ``hold`` more
calls, so the counts hover around the limits and a share of calls is rejected.
The mix (see :func:`_templates`) trips the policy's limits; emergency calls are
left out because a bypassing emergency call may legitimately exceed a max.

Over-admission audit (all three must find nothing):

1. every rejection reports the count it saw: a count above the effective max
   means the store had admitted past it;
2. interval audit: each admitted call is *surely* counted from the moment its
   admit returned until its release was sent (``perf_counter`` is
   ``CLOCK_MONOTONIC``, one clock for all processes). If more surely-counted
   ordinary calls overlap on one limited key than its effective max, Redis held
   more than the max at that instant. Sound (never a false alarm);
3. when the processes stop, every limited key's live count is at most its
   effective max; after the final releases every count is back at zero.

Nothing is timed in the test suite: these figures live in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

DEFAULT_POLICY = "policies/example.yaml"
PROCESS_COUNTS = (1, 2, 4, 8)
BARE_PROCESSES = 8
#: Callers and accounts of the mix (see :func:`_templates`).
USERS = 96
ACCOUNTS = 12
CEILING_CLIENTS = 8


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", metavar="URL", default=None,
                        help="Redis to measure against (default: start a private "
                             "redis-server and stop it afterwards). Only keys of a "
                             "bench namespace are written, and they are deleted.")
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
    parser.add_argument("--timeout-ms", type=int, default=None,
                        help="store timeout (default: the policy's store_timeout)")
    parser.add_argument("--expiry-members", type=int, default=50_000,
                        help="members per key in the expiry and counting checks "
                             "(default 50000; 0 skips both)")
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
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.hold < 1:
        print("policer bench: --processes, --seconds and --hold must be positive",
              file=sys.stderr)
        return 2
    _configure_logging(args.log_level)

    from policer.policy import PolicyError, load_policy
    from policer.redis_server import RedisServer, RedisServerError

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
        bench = _Bench(args, policy, url, owned=server is not None, counts=counts)
        result = bench.run_all()
    finally:
        if server is not None:
            server.stop()

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_human(result))
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


# --------------------------------------------------------------------------- the call mix


@dataclass(frozen=True, slots=True)
class _Template:
    """One call shape of the mix, prepared once: everything but its Call-ID."""

    call: dict[str, Any]  # Call fields except call_id / from_tag
    keys: tuple[str, ...]  # admit.lua KEYS for Call-ID TEMPLATE_CALL_ID
    args: tuple[Any, ...]  # admit.lua ARGV for Call-ID TEMPLATE_CALL_ID
    did_keys: tuple[int, ...]  # KEYS that name the dialog
    did_args: tuple[int, ...]  # ARGV that are the dialog id
    cid_args: tuple[int, ...]  # ARGV that are the Call-ID
    members: tuple[Any, ...]  # the memberships (policer.store.base.Member)
    audited: tuple[tuple[str, int], ...]  # (limited key, effective max for ordinary calls)

    def arguments(self, call_id: str, did: str) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV for one call: exactly what the engine sends for it."""
        keys = list(self.keys)
        for i in self.did_keys:
            keys[i] = keys[i].replace(TEMPLATE_DID, did)
        args = list(self.args)
        for i in self.did_args:
            args[i] = did
        for i in self.cid_args:
            args[i] = call_id
        return keys, args


TEMPLATE_CALL_ID = "CALLID0000"
TEMPLATE_DID = TEMPLATE_CALL_ID + ";tag"


def _numbers_by_class(policy: Any, classifier: Any) -> dict[str, list[str]]:
    """A few dialled numbers per non-emergency class of the policy."""
    rng = random.Random(7)
    out: dict[str, list[str]] = {}
    candidates: list[str] = []
    for c in policy.classes:
        for p in c.prefixes:
            candidates += [p + "".join(rng.choice("123456789") for _ in range(9 - len(p) % 3))
                           for _ in range(8)]
    candidates += ["".join(rng.choice("23456789") for _ in range(8)) for _ in range(16)]
    for n in candidates:
        cls = classifier.number_class(n)
        if cls is None or cls == policy.emergency_class:
            continue
        out.setdefault(cls, [])
        if len(out[cls]) < 8:
            out[cls].append(n)
    return out


class _Capture:
    """A store that keeps the engine's admit request instead of sending it."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.request: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def admit(self, request: Any) -> Any:
        from policer.store.base import AdmitResult

        self.request = request
        return AdmitResult(admitted=True)  # (an error would open the engine's breaker)


def _templates(policy: Any, store: Any, count: int = 1024) -> list[_Template]:
    """The mix: dialled numbers of every non-emergency class (the default class
    three parts, each other class one: with the example policy 60 % local, 20 %
    domestic, 20 % international), callers from a pool of ``USERS``, ``ACCOUNTS``
    accounts (one call in five without an account), 8 source addresses. With
    about 110 calls held, this trips the example policy's total, international,
    per-user and per-account limits, each some of the time."""
    from policer.call import Call
    from policer.classify import Classifier
    from policer.engine import Engine

    classifier = Classifier(policy)
    capture = _Capture(store)
    engine = Engine(policy, capture, node="bench")
    numbers = _numbers_by_class(policy, classifier)
    default = next((c.name for c in policy.classes if c.default), None)
    # the default class (local calls) three parts, every other class one part
    classes = [c for c in sorted(numbers) for _ in range(3 if c == default else 1)]
    rng = random.Random(42)
    headers = policy.header_names
    out: list[_Template] = []
    for i in range(count):
        cls = classes[i % len(classes)]
        number = rng.choice(numbers[cls])
        user = f"u{rng.randrange(USERS):02d}"
        hdrs = {}
        for h in headers:
            if rng.random() >= 0.2:
                hdrs[h] = f"acct{rng.randrange(ACCOUNTS):02d}"
        fields: dict[str, Any] = {
            "from_user": user, "from_domain": "bench.invalid", "ruri_user": number,
            "to_user": number, "source_ip": f"192.0.2.{rng.randrange(8) + 1}",
            "auth_user": user, "headers": hdrs,
        }
        call = Call(call_id=TEMPLATE_CALL_ID, from_tag="tag", **fields)
        c = classifier.classify(call)
        capture.request = None
        engine.admit(call)  # the request exactly as the engine makes it
        request = capture.request
        if request is None or request.dialog_id != call.dialog_id or \
                tuple(request.members) != tuple(c.members):
            raise RuntimeError("the engine's admit request could not be captured")
        keys, argv = store.admit_arguments(request)
        audited = []
        for m in c.members:
            if m.max >= 0 and not m.shadow:
                audited.append((store.keys.profile(m.profile, m.value), m.max - m.reserve))
        out.append(_Template(
            fields, tuple(keys), tuple(argv),
            did_keys=tuple(i for i, k in enumerate(keys) if TEMPLATE_DID in k),
            did_args=tuple(i for i, a in enumerate(argv) if a == TEMPLATE_DID),
            cid_args=tuple(i for i, a in enumerate(argv) if a == TEMPLATE_CALL_ID),
            members=c.members, audited=tuple(audited)))
    return out


# --------------------------------------------------------------------------- one worker


@dataclass(slots=True)
class _Job:
    modes: tuple[str, ...]  # ("bare", "engine"): interleaved slices; or one mode
    url: str
    namespace: str
    policy: Any
    timeout_ms: int
    templates: list[_Template]
    hold: int  # calls this process places before releasing an admitted one
    warmup: float
    seconds: float  # measured seconds per mode
    slice_s: float  # modes alternate in slices of about this length
    rate: float  # calls/s of this process (0: as fast as it can, closed loop)
    tag: str  # unique per measurement: Call-IDs never repeat


def _worker(job: _Job, index: int, barrier: Any, start: Any, out: Any) -> None:
    try:
        out.put(_work(job, index, barrier, start))
    except BaseException as e:  # the parent must hear about it, never hang
        with contextlib.suppress(Exception):
            barrier.abort()
        out.put({"error": f"{type(e).__name__}: {e}"})


def _work(job: _Job, index: int, barrier: Any, start: Any) -> dict[str, Any]:
    """Place calls until the end of the run; return samples and the audit trail.

    With two modes, time is cut into slices (ABBA order, the same instants in every
    process): bare and engine run under the same machine conditions, which matters
    on a small shared machine more than anything else.
    """
    import gc

    from policer.call import Call
    from policer.engine import Engine
    from policer.store.redis_store import RedisStore, load_lua

    store = RedisStore(job.url, job.namespace, timeout_ms=job.timeout_ms)
    engine = Engine(job.policy, store, node="bench")
    # the same engine with rejections not logged (its logger is bound at warning)
    level = os.environ.get("POLICER_LOG_LEVEL", "info")
    _configure_logging("warning")
    quiet = Engine(job.policy, store, node="bench")
    _configure_logging(level)
    client = store.client
    admit_sha = client.script_load(load_lua("admit"))
    templates = job.templates
    rng = random.Random(1000 + index)
    order = [rng.randrange(len(templates)) for _ in range(8192)]
    evalsha = client.evalsha
    perf = time.perf_counter
    admit = engine.admit
    tag = f"{job.tag}-{index}-"
    hold = job.hold
    modes = job.modes
    n_modes = len(modes)
    per_mode = max(1, round(job.seconds / job.slice_s))
    total = job.seconds * n_modes
    slice_s = total / (per_mode * n_modes)
    bare_at = modes.index("bare") if "bare" in modes else -1
    lean_at = modes.index("lean") if "lean" in modes else -1
    quiet_at = modes.index("quiet") if "quiet" in modes else -1
    admit_quiet = quiet.admit
    lean: Any = client.connection_pool.make_connection()
    lean.connect()
    from hiredis import pack_command
    gap = 1.0 / job.rate if job.rate > 0 else 0.0

    def release(did: str) -> None:  # the same in every mode: the store's own release
        store.release(did, "bye")

    lat = [array("d") for _ in modes]
    admitted = [0] * n_modes
    rejected = [0] * n_modes
    fallbacks = [0] * n_modes
    over_seen = 0
    # the audit trail, kept out of the garbage collector's way: admit returned,
    # release sent, template index
    ia, ir, it = array("d"), array("d"), array("i")
    held: deque[tuple[int, str, float, int]] = deque()  # (release at seq, did, t, template)
    seq = 0
    gc.collect()
    gc.freeze()  # a long-running proxy's start-up objects are not collected again

    if barrier.wait(timeout=60) == 0:
        start.value = perf() + job.warmup
    barrier.wait(timeout=60)
    t_start = start.value
    t_begin = t_start - job.warmup
    t_end = t_start + total
    while True:
        now = perf()
        if now >= t_end:
            break
        if gap:
            due = t_begin + seq * gap
            if now < due:
                time.sleep(due - now)
                now = perf()
        while held and held[0][0] <= seq:
            _, did, ta, ti = held.popleft()
            tr = perf()
            release(did)
            ia.append(ta)
            ir.append(tr)
            it.append(ti)
        if now < t_start:
            m = seq % n_modes
        else:
            s_i = int((now - t_start) / slice_s)
            pos = s_i % n_modes
            m = pos if (s_i // n_modes) % 2 == 0 else n_modes - 1 - pos
        ti = order[seq & 8191]
        tpl = templates[ti]
        call_id = tag + str(seq)
        seq += 1
        did = call_id + ";tag"
        if m == bare_at:
            keys, argv = tpl.arguments(call_id, did)
            t0 = perf()
            r = evalsha(admit_sha, len(keys), *keys, *argv)
            t1 = perf()
            ok = r[0] == 1
            fell = False
            if not ok and int(r[2]) > int(r[3]):
                over_seen += int(r[2]) - int(r[3])
        elif m == lean_at:
            keys, argv = tpl.arguments(call_id, did)
            t0 = perf()
            lean.send_packed_command(
                [pack_command(("EVALSHA", admit_sha, len(keys), *keys, *argv))],
                check_health=False)
            r = lean.read_response()
            t1 = perf()
            ok = r[0] == 1
            fell = False
            if not ok and int(r[2]) > int(r[3]):
                over_seen += int(r[2]) - int(r[3])
        else:
            call = Call(call_id, "tag", **tpl.call)
            t0 = perf()
            d = admit(call) if m != quiet_at else admit_quiet(call)
            t1 = perf()
            ok = d.admitted
            fell = d.fallback
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
        if ok and not fell:
            held.append((seq + hold, did, t1, ti))
        elif fell:  # may or may not be counted in Redis: never audited, released anyway
            held.append((seq + hold, did, math.inf, ti))
    gc.unfreeze()
    for _, _, ta, ti in held:
        ia.append(ta)
        ir.append(math.inf)
        it.append(ti)
    return {
        "modes": {mode: {"lat": lat[i].tobytes(), "admitted": admitted[i],
                         "rejected": rejected[i], "fallbacks": fallbacks[i],
                         "elapsed": job.seconds}
                  for i, mode in enumerate(modes)},
        "over_seen": over_seen, "ia": ia.tobytes(), "ir": ir.tobytes(), "it": it.tobytes(),
        "left": [did for _, did, _, _ in held],
    }


# --------------------------------------------------------------------------- the bench


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


class _Bench:
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
        self.client = self.admin.client
        self.ctx = mp.get_context("fork")

    def namespace(self) -> str:
        self.n += 1
        return f"{self.run_id}-{self.n}"

    # -- housekeeping
    def drop_namespace(self, namespace: str) -> None:
        from policer.store.keys import Keys

        if self.owned:
            self.client.flushall(asynchronous=True)
            return
        pattern = Keys(namespace).prefix.replace("{", "\\{").replace("}", "\\}") + "*"
        batch: list[str] = []
        for key in self.client.scan_iter(match=pattern, count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    # -- (a) and (b)
    def measure(self, modes: tuple[str, ...], processes: int,
                rate: float = 0.0) -> dict[str, dict[str, Any]]:
        """One run of ``processes`` processes; with two modes they alternate in slices.
        ``rate``: total calls/s of all processes together (0: closed loop)."""
        from policer.store.redis_store import RedisStore

        namespace = self.namespace()
        store = RedisStore(self.url, namespace, timeout_ms=self.timeout_ms)
        templates = _templates(self.policy, store)
        job = _Job(modes, self.url, namespace, self.policy, self.timeout_ms, templates,
                   hold=max(1, math.ceil(self.args.hold / processes)),
                   warmup=self.args.warmup, seconds=self.args.seconds, slice_s=0.1,
                   rate=rate / processes, tag=namespace)
        barrier = self.ctx.Barrier(processes)
        start = self.ctx.Value("d", 0.0)
        out = self.ctx.Queue()
        procs = [self.ctx.Process(target=_worker, args=(job, i, barrier, start, out),
                                  daemon=True)
                 for i in range(processes)]
        for p in procs:
            p.start()
        timeout = self.args.warmup + self.args.seconds * len(modes) + 120
        results = [out.get(timeout=timeout) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"bench worker failed: {errors[0]}")
        tripped = {prof: n for (res, prof), n in store.decisions().items() if res == "rejected"}
        audit = self.audit(store, templates, results)
        self.drop_namespace(namespace)
        out_modes: dict[str, dict[str, Any]] = {}
        for mode in modes:
            rs = [r["modes"][mode] for r in results]
            lat = array("d")
            for r in rs:
                lat.frombytes(r["lat"])
            samples = sorted(lat)
            decided = sum(r["admitted"] + r["rejected"] + r["fallbacks"] for r in rs)
            per_s = sum((r["admitted"] + r["rejected"] + r["fallbacks"]) / r["elapsed"]
                        for r in rs)
            admitted = sum(r["admitted"] for r in rs)
            out_modes[mode] = {
                "mode": mode,
                "processes": processes,
                "interleaved_with": [m for m in modes if m != mode],
                "rate_target_per_s": round(rate) if rate else None,
                "decisions": decided,
                "decisions_per_s": round(per_s),
                "admitted_share": round(admitted / decided, 3) if decided else 0.0,
                "fallbacks": sum(r["fallbacks"] for r in rs),
                "rejected_by_limit": tripped,  # the whole run (all modes, warm-up included)
                "p50_us": round(_percentile(samples, 0.50) * 1e6, 1),
                "p99_us": round(_percentile(samples, 0.99) * 1e6, 1),
                "p999_us": round(_percentile(samples, 0.999) * 1e6, 1),
                "max_us": round(samples[-1] * 1e6, 1) if samples else math.nan,
                **audit,
            }
        return out_modes

    def audit(self, store: Any, templates: list[_Template],
              results: list[dict[str, Any]]) -> dict[str, Any]:
        over_seen = sum(r["over_seen"] for r in results)
        # 2. interval audit: surely-counted ordinary calls per limited key
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
                for key, mx in templates[ti].audited:
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
        # 3. final audit: live counts at most their max, then everything released
        keys = sorted(effective)
        sizes = store._sizes(keys) if keys else []
        over_final = sum(max(0, n - effective[k]) for k, n in zip(keys, sizes, strict=True))
        for r in results:
            for did in r["left"]:
                store.release(did, "bye")
        pattern = store.keys.prefix.replace("{", "\\{").replace("}", "\\}") + "p:*"
        profile_keys = list(self.client.scan_iter(match=pattern, count=2000))
        leaked = sum(store._sizes(profile_keys)) if profile_keys else 0
        leaked += store.stats()["active"]
        return {
            "over_admissions": over_seen + over_interval + over_final,
            "audit": {"rejections_over_max": over_seen, "interval_over_max": over_interval,
                      "final_over_max": over_final, "leaked_after_release": leaked,
                      "audited_keys": len(keys), "flagged": flagged,
                      "peak_surely_live_over_max": round(peak_share, 3)},
        }

    # -- (c)
    def ceiling(self, bare_8_per_s: float) -> dict[str, Any]:
        from policer.call import key_part
        from policer.store.redis_store import RedisStore, load_lua

        exe = shutil.which("redis-benchmark")
        if exe is None:
            return {"error": "redis-benchmark is not installed (Debian: redis-tools)"}
        namespace = self.namespace()
        store = RedisStore(self.url, namespace, timeout_ms=self.timeout_ms)
        sha = self.client.script_load(load_lua("admit"))
        templates = _templates(self.policy, store)
        # the most common shape: most limited members (a valued profile with values)
        # a call of the most common shape: only the total among no-value limits (a
        # local call), with every valued membership (user, account)
        tpl = max(templates, key=lambda t: (
            -sum(1 for m in t.members if m.value is None and m.max >= 0), len(t.members)))
        keys, args = tpl.arguments("bm__rand_int__", "bm__rand_int__;tag")
        argv = [str(a) for a in args]
        early_at = args.index(self.policy.timeouts.early_ms)  # ARGV of the early timeout
        # valued members get a fresh value per call (each __rand_int__ is drawn on its
        # own), so that only the no-value limits (total, per class) press
        for m in tpl.members:
            if m.value is not None:
                enc = key_part(m.value)
                keys = [k.replace(f"p:{m.profile}:{enc}", f"p:{m.profile}:v__rand_int__")
                        for k in keys]
                argv = ["v__rand_int__" if a == enc else
                        a.replace(f"{m.profile}={enc}", f"{m.profile}=v__rand_int__")
                        for a in argv]

        def bench(requests: int, early_ms: int) -> tuple[float, str]:
            a = list(argv)
            a[early_at] = str(early_ms)
            cmd = [exe, *self._benchmark_target(), "-c", str(CEILING_CLIENTS),
                   "-n", str(requests), "-r", "100000000", "--csv",
                   "EVALSHA", sha, str(len(keys)), *keys, *a]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"redis-benchmark failed: {p.stderr.strip()[:300]}")
            rows = list(csv.reader(io.StringIO(p.stdout.strip())))
            return float(rows[-1][1]), " ".join(cmd[:12]) + " …"

        try:
            # admitted calls fall out after early_ms (swept by the script itself, the
            # "release" of this load): ~hold calls live at once, as in the runs above.
            # The rate depends on the share admitted, so calibrate twice.
            early_ms = 5
            for _ in range(2):
                pilot, _ = bench(max(5000, int(bare_8_per_s)), early_ms)
                early_ms = max(1, int(self.args.hold / pilot * 1000))
                self.drop_namespace(namespace)
            per_s, shown = bench(max(10_000, int(pilot * self.args.seconds)), early_ms)
        except (RuntimeError, subprocess.TimeoutExpired, IndexError, ValueError) as e:
            return {"error": str(e)}
        decisions = store.decisions()
        adm = sum(v for (res, prof), v in decisions.items()
                  if res == "admitted" and prof == tpl.members[0].profile)
        rej = sum(v for (res, _), v in decisions.items() if res == "rejected")
        self.drop_namespace(namespace)
        return {"per_s": round(per_s), "clients": CEILING_CLIENTS, "early_ms": early_ms,
                "admitted_share": round(adm / (adm + rej), 3) if adm + rej else 0.0,
                "command": shown}

    def _benchmark_target(self) -> list[str]:
        if self.url.startswith("unix://"):
            path = self.url[len("unix://"):].split("?", 1)[0]
            return ["-s", path]
        return ["-u", self.url]

    # -- expiry and counting
    def slowlog(self) -> contextlib.AbstractContextManager[None]:
        return _slowlog(self.client)

    def script_times(self, sha: str) -> list[int]:
        """Durations (µs) of the script's runs in SLOWLOG, newest first."""
        return [t for t, _ in self.script_entries(sha)]

    def script_entries(self, sha: str) -> list[tuple[int, str]]:
        """(duration µs, command line) of the script's runs in SLOWLOG, newest first."""
        out = []
        for e in self.client.slowlog_get(1_000_000):
            cmd = e.get("command", "")
            if isinstance(cmd, bytes):
                cmd = cmd.decode(errors="replace")
            parts = cmd.split(" ")
            if len(parts) > 1 and parts[0].lower() == "evalsha" and parts[1] == sha:
                out.append((int(e["duration"]), cmd))
        return out

    def expiry(self, members: int, repeat: int = 3) -> dict[str, Any]:
        """Every key of one call holds ``members`` expired members; admit calls until
        the bounded sweep has removed them all: how long the slowest script ran.

        Repeated ``repeat`` times: a script's duration in ``SLOWLOG`` is wall time
        inside Redis, so a Redis process that the machine preempts shows up as a slow
        script. The least disturbed repetition's maximum is the script's own bound.
        """
        from policer.call import Call
        from policer.engine import Engine
        from policer.store.redis_store import SWEEP_BATCH, RedisStore, load_lua

        sha = self.client.script_load(load_lua("admit"))
        sweeping: list[int] = []
        maxima: list[int] = []
        left = 0
        calls = math.ceil(members / SWEEP_BATCH) + 20
        n_keys = 0
        for _ in range(repeat):
            namespace = self.namespace()
            store = RedisStore(self.url, namespace, timeout_ms=30_000)
            engine = Engine(self.policy, store, node="bench")
            templates = _templates(self.policy, store)
            tpl = max(templates, key=lambda t: (len(t.members), len(t.audited)))
            zkeys = [store.keys.early, store.keys.confirmed,
                     *(store.keys.profile(m.profile, m.value) for m in tpl.members)]
            n_keys = len(zkeys)
            now_ms = store.now_ms()
            self._fill(zkeys, members, lambda i, now_ms=now_ms: now_ms - 1000 - i % 1000)
            with self.slowlog():
                for i in range(calls):
                    d = engine.admit(Call(f"exp{i}", "tag", **tpl.call))
                    if d.admitted:
                        store.release(d.dialog_id, "bye")
                times = self.script_times(sha)[::-1]  # oldest first
            left += sum(int(self.client.zcard(k)) for k in zkeys)
            self.drop_namespace(namespace)
            if times:
                maxima.append(max(times))
                sweeping += times[: math.ceil(members / SWEEP_BATCH)]
        sweeping.sort()
        return {"members_per_key": members, "keys": n_keys,
                "expired_members": members * n_keys, "sweep_batch": SWEEP_BATCH,
                "admits": calls, "repetitions": repeat,
                "max_us": max(maxima) if maxima else None,
                "max_us_per_repetition": maxima,
                "max_us_least_disturbed": min(maxima) if maxima else None,
                "sweeping_p50_us": _percentile(sweeping, 0.5) if sweeping else None,
                "sweeping_p99_us": _percentile(sweeping, 0.99) if sweeping else None,
                "left_after": left}

    def counting(self, members: int) -> dict[str, Any]:
        """Admit script time with 100 vs ``members`` live members in a limited profile."""
        from policer.call import Call
        from policer.engine import Engine
        from policer.policy import parse_policy
        from policer.store.redis_store import RedisStore, load_lua

        policy = parse_policy(
            "version: 1\nnamespace: bench\nclasses: {any: {default: true}}\n"
            "profiles: {total: {}}\nlimits: {total: {max: 1000000}}\n",
            "<bench counting policy>")
        sha = self.client.script_load(load_lua("admit"))
        sizes = (100, members)
        stores, engines = [], []
        for n in sizes:
            store = RedisStore(self.url, self.namespace(), timeout_ms=30_000)
            now_ms = store.now_ms()
            self._fill([store.keys.profile("total")], n,
                       lambda i, now_ms=now_ms: now_ms + 3_600_000 + i)
            stores.append(store)
            engines.append(Engine(policy, store, node="bench"))

        def place(prefix: str, count: int) -> None:
            for i in range(count):  # the two sizes alternate call by call
                for store, engine in zip(stores, engines, strict=True):
                    d = engine.admit(Call(f"{prefix}{i}", "tag", ruri_user="5551234"))
                    store.release(d.dialog_id, "bye")

        place("w", 200)
        with self.slowlog():
            place("c", 2000)
            entries = self.script_entries(sha)
        out: dict[str, Any] = {}
        for n, store in zip(sizes, stores, strict=True):
            mark = store.keys.prefix
            times = sorted(t for t, cmd in entries if mark in cmd)
            out[str(n)] = {"p50_us": _percentile(times, 0.5) if times else None,
                           "p99_us": _percentile(times, 0.99) if times else None,
                           "live_members": store.profile_size("total")}
        for store in stores:
            self.drop_namespace(store.namespace)
        a, b = out["100"]["p50_us"], out[str(members)]["p50_us"]
        out["ratio_p50"] = round(b / a, 2) if a and b else None
        return out

    def _fill(self, keys: list[str], members: int, score: Any) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            for start in range(0, members, 1000):
                mapping = {f"x{i}": score(i) for i in range(start, min(members, start + 1000))}
                pipe.zadd(key, mapping)
        pipe.execute()

    # -- everything
    def run_all(self) -> dict[str, Any]:
        t0 = time.monotonic()
        load_before = os.getloadavg()
        info = self.client.info("server")
        engine: dict[str, dict[str, Any]] = {}
        bare: dict[str, dict[str, Any]] = {}
        lean: dict[str, dict[str, Any]] = {}
        quiet: dict[str, dict[str, Any]] = {}
        for p in sorted(set(self.counts) | {1, BARE_PROCESSES}):
            if p in (1, BARE_PROCESSES):
                modes = ("bare", "lean", "engine", "quiet") if p == 1 else (
                    "bare", "lean", "engine")
                pair = self.measure(modes, p)
                bare[str(p)] = pair["bare"]
                lean[str(p)] = pair["lean"]
                if "quiet" in pair:
                    quiet[str(p)] = pair["quiet"]
                if p in self.counts:
                    engine[str(p)] = pair["engine"]
            else:
                engine[str(p)] = self.measure(("engine",), p)["engine"]
        paced: Any = None
        e8: Any = engine.get("8")
        if e8 and self.args.paced > 0:
            rate = e8["decisions_per_s"] * self.args.paced
            paced = self.measure(("engine",), 8, rate=rate)["engine"]
        ceiling = ({"skipped": True} if self.args.no_ceiling
                   else self.ceiling(bare[str(BARE_PROCESSES)]["decisions_per_s"]))
        expiry: Any = None
        counting: Any = None
        if self.args.expiry_members > 0:
            try:
                expiry = self.expiry(self.args.expiry_members)
                counting = self.counting(self.args.expiry_members)
            except Exception as e:  # e.g. CONFIG disabled on a managed Redis
                expiry = {"error": f"{type(e).__name__}: {e}"}
        # one audit per measurement (interleaved modes share theirs)
        runs = [*bare.values(), *(r for p, r in engine.items() if p not in bare),
                *([paced] if paced else [])]
        e1: Any = engine.get("1")
        b1, b8 = bare["1"], bare[str(BARE_PROCESSES)]
        l1 = lean["1"]
        result: dict[str, Any] = {
            "ratio_p50": round(e1["p50_us"] / b1["p50_us"], 3) if e1 else None,
            "bare_8_per_s": b8["decisions_per_s"],
            "ceiling_per_s": ceiling.get("per_s"),
            "ratio_p50_same_transport": round(e1["p50_us"] / l1["p50_us"], 3) if e1 else None,
            "over_admissions": sum(r["over_admissions"] for r in runs),
            "processes": {p: {k: r[k] for k in ("decisions_per_s", "p50_us", "p99_us",
                                                   "p999_us")}
                          for p, r in engine.items()},
            "targets": {
                "ratio_p50_le_1_2": bool(e1) and e1["p50_us"] / b1["p50_us"] <= 1.2,
                "engine_8_ge_0_8_bare_8": bool(e8) and
                e8["decisions_per_s"] >= 0.8 * b8["decisions_per_s"],
                "p99_8_le_1ms": bool(e8) and e8["p99_us"] <= 1000,
                "p99_8_paced_le_1ms": bool(paced) and paced["p99_us"] <= 1000,
                "expiry_le_1ms": bool(expiry) and
                (expiry.get("max_us_least_disturbed") or 1e9) <= 1000,
            },
            "bare": bare,
            "bare_lean": lean,
            "engine": engine,
            "engine_unlogged": quiet,
            "paced_8": paced,
            "ceiling": ceiling,
            "expiry": expiry,
            "counting": counting,
            "setup": {
                "redis": self.url if not self.owned else "private redis-server",
                "redis_version": info.get("redis_version"),
                "policy": str(self.args.policy),
                "seconds": self.args.seconds, "warmup": self.args.warmup,
                "hold": self.args.hold, "store_timeout_ms": self.timeout_ms,
                "log_level": self.args.log_level,
                "python": platform.python_version(),
                "nproc": os.cpu_count(),
                "cpu": _cpu_model(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "total_s": round(time.monotonic() - t0, 1),
            },
        }
        self.admin.close()
        return result


@contextlib.contextmanager
def _slowlog(client: Any) -> Iterator[None]:
    """Log every command (slower than 0 µs) while the block runs; restore afterwards."""
    old = client.config_get("slowlog-*")
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 100_000)
    client.slowlog_reset()
    try:
        yield
    finally:
        client.config_set("slowlog-log-slower-than", old.get("slowlog-log-slower-than", 10000))
        client.config_set("slowlog-max-len", old.get("slowlog-max-len", 128))


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- output


def _human(r: dict[str, Any]) -> str:
    lines = []
    s = r["setup"]
    lines.append(f"policer bench: {s['policy']} on {s['redis']} (Redis {s['redis_version']}), "
                 f"{s['nproc']} CPUs, Python {s['python']}, {s['seconds']} s per run")
    lines.append("")
    lines.append(f"{'run':<18}{'decisions/s':>12}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}"
                 f"{'admitted':>10}{'over':>6}")
    rows = [(f"bare x{k}", v) for k, v in r["bare"].items()]
    rows += [(f"bare-lean x{k}", v) for k, v in r["bare_lean"].items()]
    rows += [(f"engine x{k}", v) for k, v in r["engine"].items()]
    rows += [(f"engine-nolog x{k}", v) for k, v in r["engine_unlogged"].items()]
    if r.get("paced_8"):
        rows.append(("engine x8 @", r["paced_8"]))
    for name, v in rows:
        lines.append(f"{name:<18}{v['decisions_per_s']:>12,}{v['p50_us']:>9.0f}"
                     f"{v['p99_us']:>9.0f}{v['p999_us']:>10.0f}"
                     f"{v['admitted_share']:>9.0%} {v['over_admissions']:>5}")
    c = r["ceiling"]
    if "per_s" in c:
        lines.append(f"{'ceiling':<18}{c['per_s']:>12,}   (redis-benchmark -c {c['clients']}, "
                     f"admitted {c['admitted_share']:.0%})")
    else:
        lines.append(f"ceiling: {c.get('error', 'skipped')}")
    lines.append("")
    t = r["targets"]

    def mark(ok: bool) -> str:
        return "ok " if ok else "MISSED"

    e8 = r["engine"].get("8")
    lines.append(f"ratio p50 engine/bare (1 client): {r['ratio_p50']}  "
                 f"[target <= 1.2: {mark(t['ratio_p50_le_1_2'])}]; "
                 f"over bare-lean (same transport): {r['ratio_p50_same_transport']}")
    if e8:
        lines.append(f"engine x8 / bare x8: "
                     f"{e8['decisions_per_s'] / max(1, r['bare_8_per_s']):.2f}  "
                     f"[target >= 0.8: {mark(t['engine_8_ge_0_8_bare_8'])}]")
        lines.append(f"engine x8 p99: {e8['p99_us']:.0f} µs at saturation  "
                     f"[target <= 1000: {mark(t['p99_8_le_1ms'])}]")
    pc = r.get("paced_8")
    if pc:
        lines.append(f"engine x8 p99: {pc['p99_us']:.0f} µs paced at "
                     f"{pc['rate_target_per_s']:,} calls/s (row 'engine x8 @')  "
                     f"[target <= 1000: {mark(t['p99_8_paced_le_1ms'])}]")
    lines.append(f"over-admissions: {r['over_admissions']}  (must be 0)")
    ex = r.get("expiry")
    if ex and "max_us" in ex:
        lines.append(f"expiry: {ex['expired_members']:,} expired members in {ex['keys']} keys "
                     f"({ex['members_per_key']:,} each, swept {ex['sweep_batch']} per key and "
                     f"call), {ex['repetitions']} times: slowest admit script "
                     f"{ex['max_us_least_disturbed']} µs in the least disturbed run "
                     f"(each run: {', '.join(str(x) for x in ex['max_us_per_repetition'])} µs; "
                     f"sweeping scripts p50 {ex['sweeping_p50_us']} µs, "
                     f"p99 {ex['sweeping_p99_us']} µs)  "
                     f"[target <= 1000: {mark(t['expiry_le_1ms'])}]")
    elif ex:
        lines.append(f"expiry: {ex.get('error')}")
    co = r.get("counting")
    if co:
        big = next(k for k in co if k not in ("100", "ratio_p50"))
        lines.append(f"counting: admit script p50 {co['100']['p50_us']} µs with 100 live "
                     f"members, {co[big]['p50_us']} µs with {int(big):,} (x{co['ratio_p50']})")
    lines.append("bare, bare-lean, engine and engine-nolog rows with the same process count "
                 "ran interleaved (alternating 0.1 s slices).")
    lines.append(f"total time {s['total_s']} s, load average before {s['loadavg_before'][0]}, "
                 f"after {s['loadavg_after'][0]}")
    return "\n".join(lines)
