"""The policy model: the frozen tree a valid policy file becomes (:class:`Policy` and
its parts) and the error a broken one raises (:class:`PolicyError`). Nothing here
reads YAML: :mod:`policer.policy.load` builds these objects, and their defaults are
the policy language's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Literal

from policer.policy.durations import format_ms

__all__ = [
    "ATTRIBUTE_SOURCES",
    "DAYS",
    "FRAUD_STATS",
    "WINDOWS",
    "Direction",
    "FraudRule",
    "Limit",
    "Nodes",
    "NumberClass",
    "Policy",
    "PolicyError",
    "Profile",
    "Rate",
    "Reject",
    "Schedule",
    "Threshold",
    "Timeouts",
    "Window",
    "shared_counts",
]

#: Call attributes a policy can read directly (plus ``header:<Name>``).
ATTRIBUTE_SOURCES = (
    "from_user",
    "from_domain",
    "ruri_user",
    "to_user",
    "source_ip",
    "auth_user",
    "gateway",
)
#: Calendar windows of ``calls`` limits: their length in ms (``1mo``: a calendar month).
WINDOWS: Mapping[str, int] = MappingProxyType({
    "1m": 60_000, "1h": 3_600_000, "1d": 86_400_000, "7d": 7 * 86_400_000,
    "1mo": 31 * 86_400_000})
#: Day names of ``schedules``, Monday first (index = ISO weekday - 1).
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Minutes in a week.
WEEK_MIN = 7 * 1440


class PolicyError(ValueError):
    """A policy file is not valid. ``errors`` holds one line per problem; ``files``
    the ``prefixes_file`` lists it named, as far as it was read (a reloader watches
    them with the policy file for the next change)."""

    def __init__(self, errors: list[str], files: tuple[str, ...] = ()) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.files = files


@dataclass(frozen=True, slots=True)
class Reject:
    """How a rejected INVITE is answered."""

    code: int = 503
    reason: str = "Call Limit Reached"
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class NumberClass:
    """A class of dialled numbers (exact ``numbers`` or ``prefixes``)."""

    name: str
    numbers: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    default: bool = False


@dataclass(frozen=True, slots=True)
class Direction:
    """Where calls come from, by their source IP: ``networks`` (the first direction
    listed with a match wins), or the ``default`` direction of every other call."""

    name: str
    networks: tuple[IPv4Network | IPv6Network, ...] = ()
    default: bool = False


@dataclass(frozen=True, slots=True)
class Profile:
    """A dialog profile: no value (one count) or valued (one count per value). A call
    joins it when its class is one of ``when_classes`` and its direction one of
    ``when_directions`` (None: any)."""

    name: str
    value: str | None = None  # attribute source, e.g. "from_user" or "header:x-account"
    when_classes: frozenset[str] | None = None
    when_directions: frozenset[str] | None = None
    #: a level of a hierarchy (``value: {parent: PROFILE}``): this profile's value is the
    #: parent registered for the call's value of that profile
    parent_of: str | None = None
    #: a call whose value of ``parent_of`` has no parent: ``skip`` joins no count of this
    #: profile, ``reject`` rejects the call
    on_missing_parent: Literal["skip", "reject"] = "skip"

    @property
    def valued(self) -> bool:
        return self.value is not None or self.parent_of is not None


@dataclass(frozen=True, slots=True)
class Rate:
    """A generic cell rate (GCRA): ``max`` new calls per ``per_ms``, up to ``burst`` at
    once. A call passes when at most ``burst - 1`` emission intervals are owed."""

    max: int
    per_ms: int
    burst: int

    @property
    def interval_us(self) -> int:
        """The emission interval T: one call's worth of time, in microseconds."""
        return max(1, self.per_ms * 1000 // self.max)

    @property
    def tolerance_us(self) -> int:
        """How far ahead of now the owed time may run and a call still pass (tau)."""
        return self.interval_us * (self.burst - 1)

    def text(self) -> str:
        return f"{self.max}/{format_ms(self.per_ms)}"


@dataclass(frozen=True, slots=True)
class Window:
    """A calendar cap: at most ``max`` new calls per calendar ``per`` (in the policy's
    timezone; one of :data:`WINDOWS`), reset at its boundary."""

    max: int
    per: str


@dataclass(frozen=True, slots=True)
class Schedule:
    """Named hours of the week: ``days`` (0 = Monday) from ``start_min`` to ``end_min``
    minutes after local midnight; an end at or before the start wraps past midnight
    (the window belongs to the day it starts on)."""

    name: str
    days: frozenset[int]
    start_min: int
    end_min: int

    def intervals(self) -> tuple[tuple[int, int], ...]:
        """Minutes of the week ``[a, b)`` the schedule covers (Monday 00:00 = 0), split
        where they wrap past Sunday midnight."""
        out: list[tuple[int, int]] = []
        length = (self.end_min - self.start_min) % 1440 or 1440
        for d in sorted(self.days):
            a = d * 1440 + self.start_min
            b = a + length
            if b <= WEEK_MIN:
                out.append((a, b))
            else:
                out += [(a, WEEK_MIN), (0, b - WEEK_MIN)]
        return tuple(sorted(out))

    def minutes(self) -> frozenset[int]:
        return frozenset(m for a, b in self.intervals() for m in range(a, b))

    def matches(self, minute_of_week: int) -> bool:
        return any(a <= minute_of_week < b for a, b in self.intervals())


@dataclass(frozen=True, slots=True)
class Limit:
    """The caps on one profile (per value for valued profiles): concurrent calls
    (``max``, -1 none), a call rate, calendar windows and a call duration cap. In a
    list of limits, ``schedule`` names when this entry applies (None: always)."""

    profile: str
    max: int = -1
    reserve_for_emergency: int = 0
    reject: Reject = field(default_factory=Reject)
    shadow: bool = False
    rate: Rate | None = None
    calls: tuple[Window, ...] = ()
    max_duration_ms: int | None = None
    #: how a rate rejection is answered (the limit's ``reject`` when not given)
    rate_reject: Reject | None = None
    schedule: str | None = None

    @property
    def rate_answer(self) -> Reject:
        return self.rate_reject if self.rate_reject is not None else self.reject


#: The statistics a fraud rule may watch, in the order they are evaluated.
FRAUD_STATS = ("calls", "distinct_numbers", "sequential", "concurrent", "short_calls")


@dataclass(frozen=True, slots=True)
class Threshold:
    """A fraud statistic's levels: ``warning`` only reports, ``critical`` acts (None:
    no such level)."""

    warning: int | None = None
    critical: int | None = None


@dataclass(frozen=True, slots=True)
class FraudRule:
    """One rule of the ``fraud`` section: statistics per value of ``key`` over a
    calendar window ``per``, each with a warning and a critical level. The call that
    crosses ``critical`` is answered ``reject`` and its value is blocked for
    ``block_ms`` (``shadow``: only reported)."""

    name: str
    #: the key as written: a profile's name or an attribute (alias or source)
    key: str
    #: the attribute the key's value comes from
    source: str
    #: the key is a profile: ``concurrent`` counts its live calls of the value
    profile: str | None = None
    when_classes: frozenset[str] | None = None
    when_prefixes: tuple[str, ...] = ()
    when_schedule: str | None = None
    per: str = "1h"
    stats: Mapping[str, Threshold] = field(default_factory=lambda: MappingProxyType({}))
    #: ``short_calls``: an answered call shorter than this counts
    short_under_ms: int = 0
    block_ms: int = 3_600_000
    reject: Reject = field(default_factory=lambda: Reject(403, "Fraud Suspected", None))
    shadow: bool = False


def shared_counts(rules: Sequence[FraudRule]) -> dict[str, FraudRule]:
    """Each fraud rule by name -> the first rule that counts the same calls of the same
    values (the same key's attribute, window, classes, prefixes and schedule): their
    calls, distinct numbers and runs are the same counts, kept once (the library's
    state field of that rule)."""
    first: dict[tuple[object, ...], FraudRule] = {}
    out: dict[str, FraudRule] = {}
    for r in rules:
        sig = (r.source, r.per, r.when_classes, r.when_prefixes, r.when_schedule)
        out[r.name] = first.setdefault(sig, r)
    return out


@dataclass(frozen=True, slots=True)
class Nodes:
    """Per-node leases: a proxy that stops renewing loses its dialogs' counts."""

    lease_ms: int = 30_000
    renew_ms: int = 5_000
    on_node_loss: Literal["release", "keep"] = "release"


@dataclass(frozen=True, slots=True)
class Timeouts:
    early_ms: int = 120_000
    dialog_ms: int = 43_200_000
    #: answered calls end after this (None: no cap); per number class below
    max_duration_ms: int | None = None
    max_duration_by_class: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}))

    @property
    def early_s(self) -> int:
        return max(1, self.early_ms // 1000)

    @property
    def dialog_s(self) -> int:
        return max(1, self.dialog_ms // 1000)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Policy:
    """A validated policy. Build with :func:`load_policy` or :func:`parse_policy`."""

    namespace: str
    number_source: str = "ruri_user"
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    classes: tuple[NumberClass, ...] = ()
    #: call directions by source IP, in the order listed (the first match wins)
    directions: tuple[Direction, ...] = ()
    profiles: tuple[Profile, ...] = ()
    limits: Mapping[str, Limit] = field(default_factory=lambda: MappingProxyType({}))
    emergency_class: str | None = None
    emergency_bypass: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    reject: Reject = field(default_factory=Reject)
    on_store_error: Literal["admit", "reject"] = "admit"
    store_timeout_ms: int = 50
    #: bound on one ``FUNCTION LOAD`` of the policy's library (a control-plane call:
    #: ``policer load``, a reload, a node's start), apart from ``store_timeout_ms``
    load_timeout_ms: int = 10_000
    shadow: bool = False
    near_limit_ratio: float = 0.8
    nodes: Nodes = field(default_factory=lambda: Nodes())
    pending_queue: int = 10_000
    #: call-end records kept in Redis (a capped stream); 0 writes none
    call_records_keep: int = 100_000
    #: decision attempts kept in Redis (a capped stream, for ``policer replay``); 0: none
    attempts_keep: int = 100_000
    #: IANA time zone of calendar windows and schedules
    timezone: str = "UTC"
    schedules: Mapping[str, Schedule] = field(default_factory=lambda: MappingProxyType({}))
    #: every entry of every profile's limit, in order (a scheduled list has several;
    #: the first whose schedule matches applies). ``limits`` holds each first entry.
    limit_entries: Mapping[str, tuple[Limit, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    #: the file's parents (``parents.PROFILE: {VALUE: PARENT}``): per hierarchy profile,
    #: the parent of each value of the profile it is the parent of (a live entry wins)
    parents: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({}))
    #: per valued profile, the limits of single values (``limits.PROFILE.values``): a
    #: value's entries stand instead of the profile's for that value
    value_entries: Mapping[str, Mapping[str, tuple[Limit, ...]]] = field(
        default_factory=lambda: MappingProxyType({}))
    #: the ``fraud`` section's rules, in order
    fraud: tuple[FraudRule, ...] = ()
    #: fraud events kept in Redis (a capped stream)
    fraud_events_keep: int = 10_000
    source: str = "<string>"
    #: the ``prefixes_file`` lists the policy was read from (paths as opened)
    files: tuple[str, ...] = ()
    version: int = 1

    @property
    def header_names(self) -> tuple[str, ...]:
        """Lower-cased names of the SIP headers this policy reads."""
        names = [s[7:] for s in self.sources() if s.startswith("header:")]
        return tuple(dict.fromkeys(names))

    def sources(self) -> Iterable[str]:
        yield self.number_source
        yield from self.attributes.values()
        for p in self.profiles:
            if p.value is not None:
                yield p.value
        for rule in self.fraud:
            yield rule.source

    def root_source(self, profile: Profile) -> str | None:
        """The attribute a profile's value comes from at the root of its hierarchy (its
        own ``value`` when it is no hierarchy level)."""
        seen: set[str] = set()
        p: Profile | None = profile
        while p is not None and p.parent_of is not None and p.name not in seen:
            seen.add(p.name)
            p = self.profile(p.parent_of)
        return p.value if p is not None else None

    def profile(self, name: str) -> Profile | None:
        for p in self.profiles:
            if p.name == name:
                return p
        return None

    def entries(self, profile: str, value: str | None = None) -> tuple[Limit, ...]:
        """Every entry of a profile's limit (none: the profile is only counted); with a
        value, that value's own entries when the policy gives it some."""
        if value is not None and self.value_entries:
            own = self.value_entries.get(profile, {}).get(value)
            if own is not None:
                return own
        found = self.limit_entries.get(profile)
        if found is not None:
            return found
        lim = self.limits.get(profile)
        return (lim,) if lim is not None else ()

    def all_entries(self, profile: str) -> tuple[Limit, ...]:
        """The profile's entries, then every value's own (each entry once)."""
        out = self.entries(profile)
        for es in self.value_entries.get(profile, {}).values():
            out += es
        return out

    def limit_at(self, profile: str, minute_of_week: int,
                 value: str | None = None) -> Limit | None:
        """The entry that applies at a local minute of the week (Monday 00:00 = 0), for
        one value of a valued profile when given."""
        for lim in self.entries(profile, value):
            if lim.schedule is None or self.schedules[lim.schedule].matches(minute_of_week):
                return lim
        return None

    @property
    def timed(self) -> bool:
        """Some limit has a rate, a calendar window or a schedule."""
        return any(lim.rate is not None or lim.calls or lim.schedule is not None
                   for p in self.profiles for lim in self.all_entries(p.name))


