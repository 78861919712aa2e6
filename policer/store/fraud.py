"""The fraud guard's rule in Python: what the decision library's fraud.lua decides for
a call, step by step (the model the in-process store and replay run), and what the
stores report of it: :class:`FraudEvent`, :class:`FraudBlock`, :class:`FraudState`.

Per rule and value of its key, over the rule's calendar window: the calls seen
(admitted or rejected), the distinct numbers (the library lists the first 32, then
keeps a HyperLogLog; exact here), the run of calls in a row to the same number, the key
profile's live calls, the answered calls shorter than ``short_calls.under``. A
statistic that reaches a level for the first time in the window is one event; reaching
``critical`` rejects the call and blocks the value (not a shadow rule); a block stops
every call of its value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policer.calendar import LocalClock
from policer.call import Call
from policer.policy import Policy
from policer.policy.model import FRAUD_STATS, FraudRule
from policer.store.keys import key_part, value_from_key

__all__ = [
    "LEVELS",
    "FraudBlock",
    "FraudBook",
    "FraudEntry",
    "FraudEvent",
    "FraudState",
    "entries_for",
    "rule_applies",
]

#: The levels of a statistic, in the order they are reached.
LEVELS = ("warning", "critical")
#: A window's state is forgotten this long after the window ends (the library's P fidx).
STATE_GRACE_MS = 60_000
#: The critical bits of a state's levels (fraud.lua's FR.CRIT).
_CRIT = sum(2 * 4 ** i for i in range(len(FRAUD_STATS)))


@dataclass(frozen=True, slots=True)
class FraudEvent:
    """A statistic that reached a level, once per rule, value, statistic, level and
    window."""

    id: str
    rule: str
    level: str  # warning | critical
    key: str
    value: str
    stat: str
    count: int
    threshold: int
    window: str
    action: str  # report (a warning) | block | shadow (a shadow rule's critical)
    at_ms: int
    block_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "rule": self.rule, "level": self.level, "key": self.key,
                "value": self.value, "stat": self.stat, "count": self.count,
                "threshold": self.threshold, "window": self.window, "action": self.action,
                "at": self.at_ms, "block_ms": self.block_ms}

    @classmethod
    def from_fields(cls, event_id: str, f: Mapping[str, str]) -> FraudEvent:
        """An event from its stream entry's fields (the value as the library keeps it)."""
        def num(k: str) -> int:
            try:
                return int(f.get(k, "0"))
            except ValueError:
                return 0
        return cls(event_id, f.get("rule", ""), f.get("level", ""), f.get("key", ""),
                   value_from_key(f.get("value", "")), f.get("stat", ""), num("count"),
                   num("threshold"), f.get("window", ""), f.get("action", ""), num("at"),
                   num("block_ms"))


@dataclass(frozen=True, slots=True)
class FraudBlock:
    """A value a rule blocks until ``until_ms``."""

    rule: str
    value: str
    until_ms: int

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "value": self.value, "until": self.until_ms}


@dataclass(slots=True)
class FraudState:
    """One rule's statistics of one value in the current window (the library's
    ``F|``, ``Fs|`` and ``Fl|`` fields of ``rule:value``)."""

    window: str  # the window's id (its local start, ms)
    calls: int = 0
    distinct: int = 0
    sequential: int = 0
    short: int = 0
    levels: int = 0  # a bit per statistic and level already reported
    last: str = ""  # the last number dialled (encoded; only when the rule watches runs)
    #: the end of the block this rule set in the window (ms, 0 none): once it has
    #: passed, the critical levels are armed again
    until: int = 0

    def rearmed(self, now: int) -> FraudState:
        """The state as the next call reads it: a block it set that has ended re-arms
        the critical levels."""
        if 0 < self.until <= now:
            self.levels &= ~_CRIT
            self.until = 0
        return self

    def watched(self, stats: Mapping[str, object]) -> FraudState:
        """The state as a rule watching ``stats`` sees it: a state shared with other
        rules (``model.shared_counts``) may count distinct numbers and runs it does
        not watch."""
        if "distinct_numbers" not in stats:
            self.distinct = 0
        if "sequential" not in stats:
            self.sequential, self.last = 0, ""
        return self

    @classmethod
    def from_fields(cls, state: str | None, short: str | None, levels: str | None,
                    now: int) -> FraudState | None:
        """The state in the latest window of the library's fields: ``F|`` (``wid|calls|
        distinct|run|block until|last``), ``Fs|`` (``wid|short``), ``Fl|`` (``wid|levels|
        until``); a field of an older window counts as none. None: no field, or a
        malformed one."""
        parts = [None if f is None else f.split("|", n) for f, n in
                 ((state, 5), (short, 1), (levels, 2))]
        try:
            wid = max(int(p[0]) for p in parts if p is not None)
            out = cls(str(wid))
            f, sh, lv = (p if p is not None and int(p[0]) == wid else None for p in parts)
            if f is not None:
                out.calls, out.distinct, out.sequential = (int(x or 0) for x in f[1:4])
                out.last = f[5]
            if sh is not None:
                out.short = int(sh[1])
            if lv is not None:
                out.levels, out.until = int(lv[1]), int(lv[2])
        except (ValueError, IndexError):
            return None
        return out.rearmed(now)

    def stats(self, live: int | None = None) -> dict[str, int]:
        """The statistics by name (``concurrent``: ``live`` when known)."""
        out = {"calls": self.calls, "distinct_numbers": self.distinct,
               "sequential": self.sequential, "short_calls": self.short}
        if live is not None:
            out["concurrent"] = live
        return out


@dataclass(frozen=True, slots=True)
class FraudEntry:
    """A rule the call has a value of the key for (fraud.lua's plan entries)."""

    rule: FraudRule
    enc: str  # the key's value, encoded
    counts: bool  # the call's class is one the rule counts
    member: int | None  # the call's membership of the rule's key profile


def rule_applies(rule: FraudRule, number: str, minute_of_week: int,
                 schedules: Mapping[str, Any]) -> bool:
    """A rule's prefixes and schedule, for a call to ``number`` at that minute."""
    if rule.when_prefixes and not any(number.startswith(p) for p in rule.when_prefixes):
        return False
    return not (rule.when_schedule is not None
                and not schedules[rule.when_schedule].matches(minute_of_week))


def entries_for(policy: Policy, call: Call, number_class: str | None,
                member_profiles: Iterable[str]) -> tuple[FraudEntry, ...]:
    """The rules a call has a value of the key for, with whether its class counts."""
    profiles = list(member_profiles)
    out: list[FraudEntry] = []
    for rule in policy.fraud:
        v = call.attribute(rule.source)
        if not v:
            continue
        counts = rule.when_classes is None or (number_class is not None
                                               and number_class in rule.when_classes)
        member = None
        if rule.profile is not None and rule.profile in profiles:
            member = len(profiles) - 1 - profiles[::-1].index(rule.profile)
        out.append(FraudEntry(rule, key_part(v), counts, member))
    return tuple(out)


@dataclass(slots=True)
class _Pending:
    """What a check writes once the call is decided (not a duplicate)."""

    states: dict[tuple[str, str], FraudState] = field(default_factory=dict)
    numbers: list[tuple[tuple[str, str, str], str]] = field(default_factory=list)
    blocks: dict[tuple[str, str], int] = field(default_factory=dict)
    events: list[tuple[FraudRule, str, int, int, int, int]] = field(default_factory=list)


class FraudBook:
    """The fraud state the library keeps in Redis, in memory (the in-process store's
    and replay's): states, distinct numbers, blocks, events, counters."""

    def __init__(self, keep: int = 10_000) -> None:
        self.states: dict[tuple[str, str], FraudState] = {}
        self.state_ends: dict[tuple[str, str], int] = {}
        self.numbers: dict[tuple[str, str, str], set[str]] = {}
        self.blocks: dict[tuple[str, str], int] = {}
        self.events: list[FraudEvent] = []
        self.counts: dict[tuple[str, str, str], int] = {}
        self.keep = keep
        self._seq = 0

    def _state(self, rule: FraudRule, enc: str, wid: str, now: int
               ) -> tuple[FraudState, bool]:
        """fraud.lua's FR.state: the window's state (a copy), re-armed when its block
        has ended."""
        st = self.states.get((rule.name, enc))
        if st is not None and st.window == wid:
            out = FraudState(st.window, st.calls, st.distinct, st.sequential, st.short,
                             st.levels, st.last, st.until)
            if 0 < out.until <= now:
                out.levels &= ~_CRIT
                out.until = 0
            return out, False
        return FraudState(wid), True

    @staticmethod
    def _cross(rule: FraudRule, enc: str, st: FraudState, i: int, count: int,
               out: list[tuple[FraudRule, str, int, int, int, int]]) -> bool:
        t = rule.stats.get(FRAUD_STATS[i])
        if t is None:
            return False
        crit = False
        for lvl, thr in enumerate((t.warning, t.critical), start=1):
            bit = 4 ** i * lvl
            if thr is not None and count >= thr and not (st.levels // bit) % 2:
                st.levels += bit
                out.append((rule, enc, i, lvl, count, thr))
                crit = crit or lvl == 2
        return crit

    def check(self, entries: Iterable[FraudEntry], number: str, now: int, lnow: int,
              clock: LocalClock, schedules: Mapping[str, Any],
              live: Callable[[int], int], dry: bool) -> tuple[FraudRule | None, _Pending]:
        """fraud.lua's FR.check: the rule that rejects the call (a block in force, or a
        critical level reached; None), and what to write once the call is decided."""
        rej: FraudRule | None = None
        w = _Pending()
        mow = clock.minute_of_week(lnow)
        for fe in entries:
            r = fe.rule
            b = self.blocks.get((r.name, fe.enc))
            if b is not None and b > now and not r.shadow and rej is None:
                rej = r
            if not fe.counts or not rule_applies(r, number, mow, schedules) or dry:
                continue
            start, end = clock.window(r.per, lnow)
            wid = str(start)
            st, _ = self._state(r, fe.enc, wid, now)
            st.calls += 1
            crit = self._cross(r, fe.enc, st, 0, st.calls, w.events)
            if "distinct_numbers" in r.stats and number:
                hk = (r.name, fe.enc, wid)
                if number not in self.numbers.get(hk, set()) and \
                        all(n != number for k, n in w.numbers if k == hk):
                    st.distinct += 1
                w.numbers.append((hk, number))
                crit = self._cross(r, fe.enc, st, 1, st.distinct, w.events) or crit
            if "sequential" in r.stats:  # (runs are kept only when the rule watches them)
                dialled = key_part(number)
                st.sequential = st.sequential + 1 if dialled == st.last else 1
                st.last = dialled
                crit = self._cross(r, fe.enc, st, 2, st.sequential, w.events) or crit
            if "concurrent" in r.stats and fe.member is not None:
                crit = self._cross(r, fe.enc, st, 3, live(fe.member) + 1, w.events) or crit
            w.states[(r.name, fe.enc)] = st
            self.state_ends.setdefault((r.name, fe.enc), 0)
            self.state_ends[(r.name, fe.enc)] = end + STATE_GRACE_MS
            if crit and not r.shadow:
                if rej is None:
                    rej = r
                till = now + r.block_ms
                st.until = till
                if not (b is not None and b >= till):
                    w.blocks[(r.name, fe.enc)] = till
        return rej, w

    def write(self, w: _Pending, now: int) -> None:
        """fraud.lua's FR.write: the states, sketches, blocks and events of a decided
        call."""
        self.states.update(w.states)
        for hk, number in w.numbers:
            self.numbers.setdefault(hk, set()).add(number)
        self.blocks.update(w.blocks)
        self.emit(w.events, now)

    def emit(self, events: Iterable[tuple[FraudRule, str, int, int, int, int]],
             now: int) -> None:
        for r, enc, i, lvl, count, thr in events:
            level = LEVELS[lvl - 1]
            action = "report" if lvl == 1 else "shadow" if r.shadow else "block"
            self._seq += 1
            self.events.append(FraudEvent(
                f"{now}-{self._seq}", r.name, level, r.key, value_from_key(enc),
                FRAUD_STATS[i], count, thr, r.per, action, now, r.block_ms))
            k = (r.name, level, FRAUD_STATS[i])
            self.counts[k] = self.counts.get(k, 0) + 1
        del self.events[:-self.keep]

    def short(self, entries: Iterable[FraudEntry], number: str, began: int, now: int,
              clock: LocalClock, schedules: Mapping[str, Any]) -> None:
        """fraud.lua's FR.short: an answered call that ended after less than a rule's
        ``under`` counts in its short calls."""
        dur = now - began
        mow = clock.minute_of_week(now)
        events: list[tuple[FraudRule, str, int, int, int, int]] = []
        for fe in entries:
            r = fe.rule
            if not fe.counts or "short_calls" not in r.stats or not 0 <= dur < \
                    r.short_under_ms or not rule_applies(r, number, mow, schedules):
                continue
            start, end = clock.window(r.per, now)
            st, _ = self._state(r, fe.enc, str(start), now)
            st.short += 1
            crit = self._cross(r, fe.enc, st, 4, st.short, events)
            if crit and not r.shadow:
                st.until = self.blocks[(r.name, fe.enc)] = now + r.block_ms
            self.states[(r.name, fe.enc)] = st
            self.state_ends[(r.name, fe.enc)] = end + STATE_GRACE_MS
        self.emit(events, now)

    def sweep(self, now: int) -> None:
        """The tick's share: states of ended windows and ended blocks are forgotten."""
        for k in [k for k, end in self.state_ends.items() if end <= now]:
            self.states.pop(k, None)
            del self.state_ends[k]
        for k in [k for k, till in self.blocks.items() if till <= now]:
            del self.blocks[k]
        for hk in [hk for hk in self.numbers
                   if (hk[0], hk[1]) not in self.states
                   or self.states[(hk[0], hk[1])].window != hk[2]]:
            del self.numbers[hk]

    def blocks_now(self, now: int) -> list[FraudBlock]:
        return sorted((FraudBlock(rule, value_from_key(enc), till)
                       for (rule, enc), till in self.blocks.items() if till > now),
                      key=lambda b: (b.rule, b.value))

    def lift(self, rules: Iterable[str], value: str, now: int) -> list[str]:
        enc = key_part(value)
        out = []
        for rule in rules:
            till = self.blocks.pop((rule, enc), None)
            if till is not None and till > now:
                out.append(rule)
        return out
