"""Figures ``policer bench`` reads from Redis itself: its CPU per whole call (INFO cpu,
INFO commandstats, SLOWLOG), the slowest admit while many dialogs expire together,
counting cost by live members, and the redis-benchmark ceiling."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from benchmarks.load import percentile
from benchmarks.mix import NODE, Template, templates

__all__ = ["ceiling", "counting", "cpu_observer", "expiry"]

#: Admits placed between two tick calls while the tick clears expired dialogs.
ADMITS_PER_TICK = 10
CEILING_CLIENTS = 8


# --------------------------------------------------------------------------- Redis's own view


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    out = {}
    for k, v in client.info("commandstats").items():
        if k.startswith("cmdstat_") and isinstance(v, dict):
            out[k[8:]] = (int(v.get("calls", 0)), int(v.get("usec", 0)))
    return out


@contextlib.contextmanager
def slowlog(client: Any) -> Iterator[None]:
    """Log every command (slower than 0 µs) while the block runs; restore afterwards."""
    old = client.config_get("slowlog-*")
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 200_000)
    client.slowlog_reset()
    try:
        yield
    finally:
        client.config_set("slowlog-log-slower-than", old.get("slowlog-log-slower-than", 10000))
        client.config_set("slowlog-max-len", old.get("slowlog-max-len", 128))


def function_times(client: Any) -> dict[str, list[int]]:
    """Durations (µs, oldest first) of the function calls in SLOWLOG, by function name."""
    out: dict[str, list[int]] = {}
    for e in reversed(client.slowlog_get(1_000_000)):
        cmd = e.get("command", "")
        if isinstance(cmd, bytes):
            cmd = cmd.decode(errors="replace")
        parts = cmd.split(" ", 2)
        if len(parts) > 1 and parts[0].lower() in ("fcall", "fcall_ro"):
            out.setdefault(parts[1], []).append(int(e["duration"]))
    return out


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


def _calls(store: Any) -> dict[str, int]:
    s = store.stats()
    return {"invites": s["processed"] + s["rejected"], "admitted": s["processed"],
            "ended": s["ended"]}


def cpu_observer(bench: Any, sample_s: float) -> Callable[[Any, float, float], dict[str, Any]]:
    """What :func:`benchmarks.load.measure` runs beside the load for the Redis CPU
    figure: INFO cpu and commandstats at both ends of the measured window (every call's
    admit, its batched answer and end, the ticks), then ``sample_s`` seconds of SLOWLOG
    to split the function time between admit, batch and tick."""
    client = bench.client

    def observe(store: Any, t_start: float, t_end: float) -> dict[str, Any]:
        _sleep_until(t_start)
        w0, cpu0, cmd0, calls0 = time.monotonic(), _redis_cpu(client), _commandstats(client), \
            _calls(store)
        _sleep_until(t_end)
        w1, cpu1, cmd1, calls1 = time.monotonic(), _redis_cpu(client), _commandstats(client), \
            _calls(store)
        c0 = _calls(store)
        with slowlog(client):
            time.sleep(sample_s)
            c1 = _calls(store)
            times = function_times(client)
        invites = calls1["invites"] - calls0["invites"]
        admitted = calls1["admitted"] - calls0["admitted"]
        ended = calls1["ended"] - calls0["ended"]
        cpu_us = (cpu1 - cpu0) * 1e6
        per: dict[str, dict[str, float]] = {}
        for name, (n1, u1) in cmd1.items():
            n0, u0 = cmd0.get(name, (0, 0))
            if n1 > n0 and invites:
                per[name] = {"calls": round((n1 - n0) / invites, 2),
                             "usec": round((u1 - u0) / invites, 2)}
        lib = store.library
        sampled = max(1, c1["invites"] - c0["invites"])
        split = {}
        for op in ("admit", "batch", "tick"):
            t = times.get(lib.function(op), [])
            split[op] = {"calls": len(t), "us_per_invite": round(sum(t) / sampled, 2),
                         "p50_us": percentile(sorted(t), 0.5) if t else None,
                         "max_us": max(t) if t else None}
        return {
            "window_s": round(w1 - w0, 2),
            "invites": invites, "admitted": admitted, "ended": ended,
            "invites_per_s": round(invites / max(w1 - w0, 1e-9)),
            "redis_cpu_s": round(cpu1 - cpu0, 3),
            "us_per_invite": round(cpu_us / invites, 1) if invites else None,
            "us_per_admitted_call": round(cpu_us / admitted, 1) if admitted else None,
            "fcall_usec_per_invite": per.get("fcall", {}).get("usec"),
            "commandstats_per_invite": dict(sorted(per.items(), key=lambda kv: -kv[1]["usec"])),
            "slowlog_sample": {"seconds": sample_s, "invites": sampled, **split},
        }

    return observe


# --------------------------------------------------------------------------- filling


def _record_calls(store: Any, fields: dict[str, Any], count: int, node: str, tag: str) -> None:
    """``count`` calls of one shape recorded (counted without a limit check, as for a
    call the fallback admitted): one pipelined ``FCALL`` per call."""
    from policer.call import Call

    head = ("FCALL", store.library.function("admit"), 1, store.library.prefix)
    client = store.client
    for start in range(0, count, 2000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + 2000)):
            pipe.execute_command(*head, *store.call_arguments(
                Call(f"{tag}{i}", "tag", **fields), node, "r"))
        if any(r[0] != 1 for r in pipe.execute()):
            raise RuntimeError("recording a call failed")


def _zcard(client: Any, keys: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.zcard(k)
    return sum(int(n) for n in pipe.execute())


# --------------------------------------------------------------------------- expiry


def expiry(bench: Any, total_members: int, repeat: int = 3) -> dict[str, Any]:
    """About ``total_members`` members expire together: dialogs of the mix's call shape
    with the most keys, recorded by a node that then went silent, each a member of
    every profile key of the call and of the node's index, all past their deadline at
    once (a store whose clock runs ``early timeout + 1 s`` ahead sees them so). Then,
    like a proxy, tick calls end them (each a bounded batch) with ``ADMITS_PER_TICK``
    admits (each released at once) after each tick call, until the tick finds none.
    SLOWLOG gives each function call's time inside Redis: the slowest admit (its
    target), and each tick call (an admit that arrives meanwhile waits for it).

    Repeated ``repeat`` times: SLOWLOG times are wall time inside Redis, so a Redis
    that the machine preempts shows a slow call; the least disturbed repetition's
    maximum is the function's own bound."""
    from policer.call import Call
    from policer.compile import TICK_BATCH
    from policer.engine import Engine
    from policer.store.base import Op
    from policer.store.redis_store import RedisStore

    policy = bench.policy
    client = bench.client
    sweep = policy.nodes.on_node_loss == "release"
    reps: list[dict[str, Any]] = []
    for _ in range(repeat):
        namespace = bench.namespace()
        store = RedisStore(bench.url, namespace, timeout_ms=30_000, policy=policy)
        store.load(policy)
        mix = templates(policy, store, Engine(policy, store, node=NODE), count=64)
        tpl = max(mix, key=lambda t: len(t.keys))
        # (a dialog was a member of each of its profiles' sets and of its node's index;
        # now it is one member of the node's index and one count per profile: the same
        # number of dialogs keeps the figure comparable)
        keys = [store.keys.node("bench-silent")]
        dialogs = math.ceil(total_members / (len(tpl.keys) + 1))
        t0 = time.monotonic()
        _record_calls(store, tpl.call, dialogs, "bench-silent", f"{namespace}-x")
        fill_s = time.monotonic() - t0
        if fill_s > 40:  # the records outlive their deadline by 60 s of real time
            raise RuntimeError(f"recording {dialogs} calls took {fill_s:.0f} s: too slow")
        late = RedisStore(bench.url, namespace, timeout_ms=30_000, policy=policy,
                          clock_offset_ms=policy.timeouts.early_ms + 1000)
        engine = Engine(policy, late, node=NODE)
        members = _zcard(client, keys)
        live_before = sum(late.sizes(list(tpl.keys)))
        ticks = admits = ended = 0
        t0 = time.monotonic()
        with slowlog(client):
            while True:
                expired = late.tick(NODE, policy.nodes.lease_ms, sweep).expired
                ticks += 1
                ended += expired
                for _ in range(ADMITS_PER_TICK):
                    d = engine.admit(Call(f"{namespace}-a{admits}", "tag", **tpl.call))
                    admits += 1
                    if d.admitted:
                        late.apply([Op("release", d.dialog_id, "bye")])
                if expired < TICK_BATCH or ticks > dialogs:
                    break
            times = function_times(client)
        sweep_s = time.monotonic() - t0
        left = _zcard(client, keys)
        bench.drop_namespace(namespace)
        admit_t = sorted(times.get(late.library.function("admit"), []))
        tick_t = sorted(times.get(late.library.function("tick"), []))
        reps.append({"admit_max_us": admit_t[-1] if admit_t else None,
                     "admit_p50_us": percentile(admit_t, 0.5) if admit_t else None,
                     "tick_max_us": tick_t[-1] if tick_t else None,
                     "tick_p50_us": percentile(tick_t, 0.5) if tick_t else None,
                     "keys": len(keys), "dialogs": dialogs,
                     "tick_calls": ticks, "admits": admits, "dialogs_ended": ended,
                     "members_before": members, "live_before": live_before,
                     "members_left": left, "fill_s": round(fill_s, 1),
                     "sweep_s": round(sweep_s, 2)})
    maxima = [r["admit_max_us"] for r in reps if r["admit_max_us"] is not None]
    tick_maxima = [r["tick_max_us"] for r in reps if r["tick_max_us"] is not None]
    first = reps[0]
    return {
        "expired_members": first["members_before"], "keys": first["keys"],
        "dialogs": first["dialogs"], "sweep_batch": TICK_BATCH,
        "admits_per_tick": ADMITS_PER_TICK, "repetitions": repeat,
        "max_us": max(maxima) if maxima else None,
        "max_us_per_repetition": maxima,
        "max_us_least_disturbed": min(maxima) if maxima else None,
        "tick_max_us_least_disturbed": min(tick_maxima) if tick_maxima else None,
        "tick_p50_us": first["tick_p50_us"],
        "tick_us_per_dialog": round(first["tick_p50_us"] / TICK_BATCH, 1)
        if first["tick_p50_us"] else None,
        "left_after": sum(r["members_left"] for r in reps),
        "runs": reps,
    }


# --------------------------------------------------------------------------- counting


def counting(bench: Any, members: int) -> dict[str, Any]:
    """Admit time inside Redis with 100 vs ``members`` live members in a limited
    profile (``ZCOUNT`` is O(log n)): both namespaces are admitted into call by call."""
    from policer.call import Call
    from policer.engine import Engine
    from policer.policy import parse_policy
    from policer.store.base import Op
    from policer.store.redis_store import RedisStore

    policy = parse_policy(
        "version: 1\nnamespace: bench\nclasses: {any: {default: true}}\n"
        "profiles: {total: {}}\nlimits: {total: {max: 10000000}}\n"
        "timeouts: {early: 1h}\n", "<bench counting policy>")
    fields: dict[str, Any] = {"ruri_user": "5551234", "from_user": "alice"}
    sizes = (100, members)
    stores, engines = [], []
    for n in sizes:
        store = RedisStore(bench.url, bench.namespace(), timeout_ms=30_000, policy=policy)
        store.load(policy)
        _record_calls(store, fields, n, NODE, f"{store.namespace}-x")
        stores.append(store)
        engines.append(Engine(policy, store, node=NODE))

    def place(prefix: str, count: int) -> None:
        for i in range(count):  # the two sizes alternate call by call
            for store, engine in zip(stores, engines, strict=True):
                d = engine.admit(Call(f"{prefix}{i}", "tag", **fields))
                store.apply([Op("release", d.dialog_id, "bye")])

    place("w", 200)
    with slowlog(bench.client):
        place("c", 2000)
        times = function_times(bench.client)
    out: dict[str, Any] = {}
    for n, store in zip(sizes, stores, strict=True):
        t = sorted(times.get(store.library.function("admit"), []))
        out[str(n)] = {"p50_us": percentile(t, 0.5) if t else None,
                       "p99_us": percentile(t, 0.99) if t else None,
                       "live_members": store.profile_size("total")}
        bench.drop_namespace(store.namespace)
    a, b = out["100"]["p50_us"], out[str(members)]["p50_us"]
    out["ratio_p50"] = round(b / a, 2) if a and b else None
    return out


# --------------------------------------------------------------------------- ceiling


def ceiling(bench: Any, bare_8_per_s: float) -> dict[str, Any]:
    """``redis-benchmark -c 8`` calling the admit function with the arguments of the
    mix's most common shape (C clients: what Redis itself does with this function).
    Valued attributes (caller, account) get a fresh value per call, so only the
    no-value limits (total, per class) press; admitted calls drop out of the counts
    after an early timeout set so that about --hold calls are live at once (the
    function is compiled with it in a namespace of its own)."""
    from policer.call import Call, pack_fields
    from policer.engine import Engine
    from policer.store.redis_store import RedisStore

    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {"error": "redis-benchmark is not installed (Debian: redis-tools)"}
    policy = bench.policy
    valued = {p.value for p in policy.profiles if p.value is not None}
    store = RedisStore(bench.url, bench.namespace(), timeout_ms=30_000, policy=policy)
    store.load(policy)
    mix = templates(policy, store, Engine(policy, store, node=NODE), count=64)
    bench.drop_namespace(store.namespace)

    def no_value_limits(t: Template) -> int:
        return sum(1 for k, _ in t.audited if k[len(store.keys.prefix):].count(":") == 1)

    tpl = max(mix, key=lambda t: (-no_value_limits(t), len(t.keys)))
    call = Call("x", "tag", **tpl.call)

    def run(requests: int, early_ms: int) -> tuple[float, str, Any]:
        variant = replace(policy, timeouts=replace(policy.timeouts, early_ms=early_ms))
        s = RedisStore(bench.url, bench.namespace(), timeout_ms=30_000, policy=variant)
        s.load(variant)
        attrs = pack_fields("v__rand_int__" if src in valued else call.attribute(src)
                            for src in s.library.attributes).decode()
        cmd = [exe, *bench.benchmark_target(), "-c", str(CEILING_CLIENTS), "-n", str(requests),
               "-r", "100000000", "--csv", "FCALL", s.library.function("admit"), "1",
               s.library.prefix, NODE, "bm__rand_int__", "tag", attrs, "a", "0"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed: {p.stderr.strip()[:300]}")
        rows = list(csv.reader(io.StringIO(p.stdout.strip())))
        calls = _calls(s)
        bench.drop_namespace(s.namespace)
        return float(rows[-1][1]), " ".join(cmd[:13]) + " …", calls

    try:
        early_ms = 5
        for _ in range(2):  # the rate depends on the share admitted: calibrate twice
            pilot, _, _ = run(max(5000, int(bare_8_per_s)), early_ms)
            early_ms = max(1, int(bench.args.hold / pilot * 1000))
        per_s, shown, calls = run(max(10_000, int(pilot * bench.args.seconds)), early_ms)
    except (RuntimeError, subprocess.TimeoutExpired, IndexError, ValueError) as e:
        return {"error": str(e)}
    return {"per_s": round(per_s), "clients": CEILING_CLIENTS, "early_ms": early_ms,
            "admitted_share": round(calls["admitted"] / calls["invites"], 3)
            if calls["invites"] else 0.0, "command": shown}
