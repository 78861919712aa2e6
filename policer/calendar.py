"""Local time for calendar windows and schedules, the way the decision function
computes it.

Redis's Lua has no time zone database, so a policy's ``timezone`` is compiled
into a table of UTC offsets and the instants they change (:func:`transitions`,
2000 to 2100). :class:`LocalClock` answers from the same table with the same
arithmetic as the library's ``lua/lib/calendar.lua``: the in-process model store and the admin reads
use it, so they agree with Redis to the millisecond, DST days included.
"""

from __future__ import annotations

import bisect
import datetime as dt
import zoneinfo
from functools import cache

__all__ = ["LocalClock", "transitions"]

_DAY_MS = 86_400_000
_FIRST_YEAR, _LAST_YEAR = 2000, 2100


def _offset_ms(zone: zoneinfo.ZoneInfo, utc_s: int) -> int:
    t = dt.datetime.fromtimestamp(utc_s, dt.UTC).astimezone(zone)
    off = t.utcoffset()
    return int(off.total_seconds() * 1000) if off is not None else 0


@cache
def transitions(tz: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(at, offsets)``: the UTC offset (ms) is ``offsets[0]`` before ``at[0]`` (UTC
    ms) and ``offsets[i + 1]`` from ``at[i]`` on. ``UTC``: ``((), (0,))``."""
    zone = zoneinfo.ZoneInfo(tz)
    start = int(dt.datetime(_FIRST_YEAR, 1, 1, tzinfo=dt.UTC).timestamp())
    end = int(dt.datetime(_LAST_YEAR, 1, 1, tzinfo=dt.UTC).timestamp())
    at: list[int] = []
    offsets = [_offset_ms(zone, start)]
    step = 6 * 3600  # no zone changes its offset twice within six hours
    t = start
    while t < end:
        nxt = t + step
        if _offset_ms(zone, nxt) != offsets[-1]:
            lo, hi = t, nxt  # the change is in (lo, hi]: find its second
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset_ms(zone, mid) == offsets[-1]:
                    lo = mid
                else:
                    hi = mid
            at.append(hi * 1000)
            offsets.append(_offset_ms(zone, hi))
        t = nxt
    return tuple(at), tuple(offsets)


def _civil(days: int) -> tuple[int, int]:
    """Days since 1970-01-01 to (year, month)."""
    d = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    return d.year, d.month


def _days(year: int, month: int) -> int:
    return (dt.date(year, month, 1) - dt.date(1970, 1, 1)).days


class LocalClock:
    """Wall-clock arithmetic in one time zone, on the decision function's terms."""

    def __init__(self, tz: str) -> None:
        self.tz = tz
        self._at, self._offsets = transitions(tz)

    def offset(self, utc_ms: int) -> int:
        return self._offsets[bisect.bisect_right(self._at, utc_ms)]

    def minute_of_week(self, utc_ms: int) -> int:
        """Minutes since local Monday 00:00."""
        local = utc_ms + self.offset(utc_ms)
        days = local // _DAY_MS
        return ((days + 3) % 7) * 1440 + (local % _DAY_MS) // 60_000

    def window(self, per: str, utc_ms: int) -> tuple[int, int]:
        """The calendar window ``per`` holding ``utc_ms``: (its id, the local ms of its
        start; its end in UTC ms)."""
        off = self.offset(utc_ms)
        local = utc_ms + off
        if per == "1m":
            start = local - local % 60_000
            end = start + 60_000
        elif per == "1h":
            start = local - local % 3_600_000
            end = start + 3_600_000
        elif per == "1d":
            start = local - local % _DAY_MS
            end = start + _DAY_MS
        elif per == "7d":
            days = local // _DAY_MS
            start = (days - (days + 3) % 7) * _DAY_MS
            end = start + 7 * _DAY_MS
        elif per == "1mo":
            year, month = _civil(local // _DAY_MS)
            start = _days(year, month) * _DAY_MS
            end = _days(year + month // 12, month % 12 + 1) * _DAY_MS
        else:
            raise ValueError(f"unknown calendar window {per!r}")
        return start, end - self.offset(end - off)
