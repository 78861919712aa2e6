"""``policer top``: like ``top``, for call limits. A table of profiles (count,
limit, utilisation bar, admitted and rejected per second) refreshed every
second; plain text, fine over SSH. ``--once`` prints one frame. Values from SIP are
shown in the printable form (:func:`policer.printable.printable`), so none can move
the cursor or clear the screen.
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

from policer.policy import Policy
from policer.printable import printable
from policer.snapshot import ProfileRow, Snapshot, take_snapshot
from policer.store.base import AdminStore

__all__ = ["render", "run_top"]


def _bar(u: float | None, width: int) -> str:
    if u is None:
        return " " * (width + 2)
    filled = min(width, round(u * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _rate(now: Snapshot, before: Snapshot | None, result: str, profile: str,
          seconds: float) -> str:
    if before is None or seconds <= 0:
        return "-"
    delta = now.decided(result, profile) - before.decided(result, profile)
    if result == "admitted":
        delta += now.decided("bypassed", profile) - before.decided("bypassed", profile)
    return f"{delta / seconds:.1f}"


def render(policy: Policy, now: Snapshot, before: Snapshot | None = None,
           seconds: float = 0.0, width: int = 100) -> str:
    """One frame as text."""
    s = now.stats
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    lines = [
        f"policer top - {stamp}  namespace {policy.namespace}  policy "
        f"{printable(policy.source)}",
        f"dialogs: {s.get('active', 0)} active ({s.get('early', 0)} early, "
        f"{s.get('confirmed', 0)} confirmed)  processed {s.get('processed', 0)}  "
        f"rejected {s.get('rejected', 0)}  failed {s.get('failed', 0)}  "
        f"expired {s.get('expired', 0)}",
        "",
    ]
    bar_w = max(10, min(30, width - 70))
    lines.append(f"{'PROFILE':<24}{'COUNT':>7}{'LIMIT':>7}  {'UTIL':<{bar_w + 2}}{'%':>5}"
                 f"{'ADM/s':>8}{'REJ/s':>8}")

    def row_line(r: ProfileRow, name: str) -> str:
        u = r.utilization
        pct = f"{u * 100:.0f}" if u is not None else "-"
        lim = str(r.limit) if r.limit is not None else "-"
        adm = _rate(now, before, "admitted", r.profile, seconds) if r.value is None else ""
        rej = _rate(now, before, "rejected", r.profile, seconds) if r.value is None else ""
        flag = " shadow" if r.shadow and r.limit is not None else ""
        if r.limit is not None and r.count > r.limit:
            # only emergency calls pass a full limit (or a live limit lowered under a count)
            by = "emergency bypass" if now.decided("bypassed", r.profile) else "limit lowered"
            flag += f" OVER ({by})"
        if r.rate_usage is not None:
            flag += f" rate {r.rate_usage * 100:.0f}%"
        for per, n in r.calls.items():
            mx = r.calls_max.get(per)
            flag += f" {per} {n}/{mx}" if mx is not None else f" {per} {n}"
        return (f"{name[:24]:<24}{r.count:>7}{lim:>7}  {_bar(u, bar_w)}{pct:>5}"
                f"{adm:>8}{rej:>8}{flag}")

    by_profile: dict[str, list[ProfileRow]] = {}
    for v in now.values:
        by_profile.setdefault(v.profile, []).append(v)
    below = {p.name: p.parent_of for p in policy.profiles if p.parent_of is not None}
    for r in now.rows:
        lines.append(row_line(r, r.profile))
        for v in by_profile.get(r.profile, []):
            lines.append(row_line(v, f"  {r.profile}={printable(v.value or '')}"))
            child = below.get(r.profile)
            if child is None:
                continue
            # a hierarchy level: the values shown of the level below, under their parent
            of = now.parents.get(r.profile, {})
            for c in by_profile.get(child, []):
                if c.value is not None and of.get(c.value) == v.value:
                    lines.append(row_line(c, f"    {child}={printable(c.value)}"))
    return "\n".join(lines)


def run_top(policy: Policy, store: AdminStore, once: bool = False, interval: float = 1.0,
            top: int = 5, out: TextIO = sys.stdout) -> int:
    before = take_snapshot(policy, store, top)
    t_before = time.monotonic()
    clear = out.isatty() and not once
    while True:
        time.sleep(interval)
        now = take_snapshot(policy, store, top)
        t_now = time.monotonic()
        width = shutil.get_terminal_size((100, 24)).columns
        frame = render(policy, now, before, t_now - t_before, width)
        out.write(("\x1b[H\x1b[2J" if clear else "") + frame + "\n")
        out.flush()
        if once:
            return 0
        before, t_before = now, t_now
