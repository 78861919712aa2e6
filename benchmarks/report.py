"""``policer bench`` for people: the figures of a result, one per line, with targets."""

from __future__ import annotations

from typing import Any

__all__ = ["human"]


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def human(r: dict[str, Any]) -> str:
    s, t = r["setup"], r["targets"]
    lines = [f"policer bench: {s['policy']} on {s['redis']} (Redis {s['redis_version']}), "
             f"{s['nproc']} CPUs ({s['cpu']}), Python {s['python']}, {s['seconds']} s per run",
             f"command: {s['command']}", "",
             f"{'run':<16}{'decisions/s':>12}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}"
             f"{'admitted':>10}{'over':>6}"]
    rows = [(f"bare x{k}", v) for k, v in r["bare"].items()]
    rows += [(f"bare-redispy x{k}", v) for k, v in r["bare_redispy"].items()]
    rows += [(f"engine x{k}", v) for k, v in r["engine"].items()]
    if r.get("paced_8"):
        rows.append(("engine x8 @", r["paced_8"]))
    for name, v in rows:
        lines.append(f"{name:<16}{v['decisions_per_s']:>12,}{v['p50_us']:>9.0f}"
                     f"{v['p99_us']:>9.0f}{v['p999_us']:>10.0f}"
                     f"{v['admitted_share']:>9.0%} {v['over_admissions']:>5}")
    c = r["ceiling"]
    if "per_s" in c:
        lines.append(f"{'ceiling':<16}{c['per_s']:>12,}   (redis-benchmark -c {c['clients']}, "
                     f"admitted {c['admitted_share']:.0%})")
    else:
        lines.append(f"ceiling: {c.get('error', 'skipped')}")
    lines.append("(rows with the same process count ran interleaved, alternating 0.1 s slices)")
    lines.append("")
    if r["ratio_p50"] is not None:
        lines.append(f"engine p50 / bare FCALL p50 (1 process): {r['ratio_p50']}  "
                     f"[target <= 1.2: {_mark(t['ratio_p50_le_1_2'])}]; "
                     f"/ FCALL through redis-py: {r['ratio_p50_redispy']}")
    e8 = r["engine"].get("8")
    if e8:
        lines.append(f"engine x8 p99: {e8['p99_us']:.0f} µs at saturation  "
                     f"[target <= 1000: {_mark(t['p99_8_le_1ms'])}]")
    pc = r.get("paced_8")
    if pc:
        lines.append(f"engine x8 p99: {pc['p99_us']:.0f} µs paced at "
                     f"{pc['rate_target_per_s']:,} calls/s  "
                     f"[target <= 1000: {_mark(t['p99_8_paced_le_1ms'])}]")
    lines.append(f"over-admissions: {r['over_admissions']}  (must be 0)")
    cpu = r.get("redis_cpu")
    if cpu and cpu.get("invites"):
        sl = cpu["slowlog_sample"]
        lines.append(
            f"Redis CPU per call (INFO cpu over {cpu['window_s']} s, {cpu['invites_per_s']:,} "
            f"calls/s from {cpu['processes']} processes, {cpu['admitted_share']:.0%} admitted, "
            f"answers and ends in batches): {cpu['us_per_admitted_call']} µs per admitted "
            f"call, {cpu['us_per_invite']} µs per INVITE  "
            f"[target <= 40: {_mark(t['redis_cpu_le_40us'])}]")
        lines.append(f"  of which FCALL (INFO commandstats) {cpu['fcall_usec_per_invite']} µs; "
                     f"inside functions per INVITE (SLOWLOG, {sl['seconds']} s): admit "
                     f"{sl['admit']['us_per_invite']} µs, batch {sl['batch']['us_per_invite']} µs, "
                     f"tick {sl['tick']['us_per_invite']} µs")
        top = list(cpu["commandstats_per_invite"].items())[:8]
        lines.append("  commandstats per INVITE (calls, µs): " + ", ".join(
            f"{k} {v['calls']}/{v['usec']}" for k, v in top))
    elif cpu:
        lines.append(f"Redis CPU per call: no calls measured ({cpu})")
    ex = r.get("expiry")
    if ex and "max_us" in ex:
        lines.append(
            f"expiry: {ex['expired_members']:,} members ({ex['dialogs']:,} dialogs x "
            f"{ex['keys']} keys) expire together; ticks end {ex['sweep_batch']} per call with "
            f"{ex['admits_per_tick']} admits after each, {ex['repetitions']} times: slowest "
            f"admit {ex['max_us_least_disturbed']} µs in the least disturbed run (each run: "
            f"{', '.join(str(x) for x in ex['max_us_per_repetition'])} µs)  "
            f"[target <= 1000: {_mark(t['expiry_le_1ms'])}]")
        lines.append(f"  tick call while clearing: p50 {ex['tick_p50_us']} µs "
                     f"({ex['tick_us_per_dialog']} µs per dialog ended), max "
                     f"{ex['tick_max_us_least_disturbed']} µs in the least disturbed run "
                     f"(an admit arriving meanwhile waits for it); members left "
                     f"{ex['left_after']}")
    elif ex:
        lines.append(f"expiry: {ex.get('error')}")
    co = r.get("counting")
    if co:
        big = next(k for k in co if k not in ("100", "ratio_p50"))
        lines.append(f"counting: admit p50 inside Redis {co['100']['p50_us']} µs with 100 live "
                     f"members, {co[big]['p50_us']} µs with {int(big):,} (x{co['ratio_p50']})")
    lines.append(f"total time {s['total_s']} s, load average before {s['loadavg_before'][0]}, "
                 f"after {s['loadavg_after'][0]}")
    return "\n".join(lines)
