"""Durations as policies write them (``250ms``, ``30s``, ``5m``, ``12h``, ``1d``,
``1h30m``, or a bare unit such as ``s``) and back."""

from __future__ import annotations

import re

__all__ = ["UNIT_MS", "format_ms", "parse_duration_ms"]

DURATION = re.compile(r"^(?:(\d+)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
#: ms per unit
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int | None:
    """``30s``, ``5m``, ``1h30m``, ``250ms`` or a bare unit (``s``) in ms; None if not one."""
    t = text.strip()
    if t in UNIT_MS:
        return UNIT_MS[t]
    if not DURATION.match(t):
        return None
    return sum(int(n) * UNIT_MS[u] for n, u in _DURATION_PART.findall(t))


def format_ms(ms: int) -> str:
    """The shortest exact form: ``2h``, ``90s``, ``250ms``."""
    if ms == 0:
        return "0ms"
    for unit in ("d", "h", "m", "s"):
        if ms % UNIT_MS[unit] == 0:
            return f"{ms // UNIT_MS[unit]}{unit}"
    return f"{ms}ms"
