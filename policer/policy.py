"""Policies: YAML files validated into immutable objects.

:func:`load_policy` reads a file, :func:`parse_policy` a string. Every problem
of a file is reported at once, each as ``FILE:LINE:COL: key.path: message``
(:class:`PolicyError` carries them). A valid policy becomes a frozen
:class:`Policy` tree that the classifier and the engine read and nothing
changes. The language is described in ``docs/policy.md``.
"""

from __future__ import annotations

import difflib
import re
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "ATTRIBUTE_SOURCES",
    "DAYS",
    "WINDOWS",
    "Limit",
    "Nodes",
    "NumberClass",
    "Policy",
    "PolicyError",
    "Profile",
    "Rate",
    "Reject",
    "Schedule",
    "Timeouts",
    "Window",
    "load_policy",
    "parse_duration_ms",
    "parse_policy",
]

#: Call attributes a policy can read directly (plus ``header:<Name>``).
ATTRIBUTE_SOURCES = (
    "from_user",
    "from_domain",
    "ruri_user",
    "to_user",
    "source_ip",
    "auth_user",
)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_DURATION = re.compile(r"^(?:(\d+)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: Calendar windows of ``calls`` limits: their length in ms (``1mo``: a calendar month).
WINDOWS: Mapping[str, int] = MappingProxyType({
    "1m": 60_000, "1h": 3_600_000, "1d": 86_400_000, "7d": 7 * 86_400_000,
    "1mo": 31 * 86_400_000})
#: Day names of ``schedules``, Monday first (index = ISO weekday - 1).
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_WEEK_MIN = 7 * 1440


class PolicyError(ValueError):
    """A policy file is not valid. ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


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
class Profile:
    """A dialog profile: no value (one count) or valued (one count per value)."""

    name: str
    value: str | None = None  # attribute source, e.g. "from_user" or "header:x-account"
    when_classes: frozenset[str] | None = None

    @property
    def valued(self) -> bool:
        return self.value is not None


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
        return f"{self.max}/{_fmt_ms(self.per_ms)}"


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
            if b <= _WEEK_MIN:
                out.append((a, b))
            else:
                out += [(a, _WEEK_MIN), (0, b - _WEEK_MIN)]
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


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. Build with :func:`load_policy` or :func:`parse_policy`."""

    namespace: str
    number_source: str = "ruri_user"
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    classes: tuple[NumberClass, ...] = ()
    profiles: tuple[Profile, ...] = ()
    limits: Mapping[str, Limit] = field(default_factory=lambda: MappingProxyType({}))
    emergency_class: str | None = None
    emergency_bypass: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    reject: Reject = field(default_factory=Reject)
    on_store_error: Literal["admit", "reject"] = "admit"
    store_timeout_ms: int = 50
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
    source: str = "<string>"
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

    def profile(self, name: str) -> Profile | None:
        for p in self.profiles:
            if p.name == name:
                return p
        return None

    def entries(self, profile: str) -> tuple[Limit, ...]:
        """Every entry of a profile's limit (none: the profile is only counted)."""
        found = self.limit_entries.get(profile)
        if found is not None:
            return found
        lim = self.limits.get(profile)
        return (lim,) if lim is not None else ()

    def limit_at(self, profile: str, minute_of_week: int) -> Limit | None:
        """The entry that applies at a local minute of the week (Monday 00:00 = 0)."""
        for lim in self.entries(profile):
            if lim.schedule is None or self.schedules[lim.schedule].matches(minute_of_week):
                return lim
        return None

    @property
    def timed(self) -> bool:
        """Some limit has a rate, a calendar window or a schedule."""
        return any(lim.rate is not None or lim.calls or lim.schedule is not None
                   for entries in self.limit_entries.values() for lim in entries)


def parse_duration_ms(text: str) -> int | None:
    """``30s``, ``5m``, ``1h30m``, ``250ms`` or a bare unit (``s``) in ms; None if not one."""
    t = text.strip()
    if t in _UNIT_MS:
        return _UNIT_MS[t]
    if not _DURATION.match(t):
        return None
    return sum(int(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(t))


# --------------------------------------------------------------------------- loading


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises :class:`PolicyError`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PolicyError([f"{p}:1:1: (file): cannot read: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise PolicyError([f"{p}:{line}:{col}: (file): not UTF-8 text "
                           f"(byte 0x{raw[e.start]:02x})"]) from None
    return parse_policy(text, str(p))


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate policy text; raises :class:`PolicyError` listing every problem."""
    v = _Validator(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = e.problem or str(e)
        cm = e.context_mark
        if (e.context and cm is not None and mark is not None
                and (cm.line, cm.column) != (mark.line, mark.column)):
            # where the unfinished construct began: usually where the mistake is
            message += f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
        raise PolicyError([f"{source}:{line}:{col}: (syntax): {message}"]) from None
    except yaml.YAMLError as e:
        raise PolicyError([f"{source}:1:1: (syntax): {e}"]) from None
    if root is None:
        raise PolicyError([f"{source}:1:1: (document): the policy is empty"])
    policy = v.policy(root)
    if v.errors or policy is None:
        raise PolicyError(v.sorted_errors())
    return policy


_TOP_KEYS = (
    "version", "namespace", "call", "classes", "profiles", "limits", "emergency",
    "timeouts", "reject", "on_store_error", "store_timeout", "shadow", "near_limit", "nodes",
    "pending_queue", "call_records", "attempts", "timezone", "schedules",
)
#: Keys of one limit (or of one entry of a scheduled list).
_LIMIT_KEYS = ("max", "reserve_for_emergency", "reject", "shadow", "rate", "calls",
               "max_duration", "rate_reject", "schedule")


class _Validator:
    """Walks the YAML node tree, collecting errors with their positions."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[tuple[int, int, str]] = []
        self._constructor = yaml.SafeLoader("")
        self.profile_names: set[str] = set()
        self.reserve_nodes: dict[str, Node] = {}

    # -- reporting
    def error(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.errors.append(
            (mark.line + 1, mark.column + 1, f"{self.source}:{mark.line + 1}:{mark.column + 1}: "
             f"{path}: {message}")
        )

    def sorted_errors(self) -> list[str]:
        return [e[2] for e in sorted(self.errors, key=lambda e: (e[0], e[1]))]

    # -- node helpers
    def mapping(self, node: Node, path: str, known: Iterable[str]) -> dict[str, Node] | None:
        """Children of a mapping node by key; reports duplicates and unknown keys."""
        if not isinstance(node, MappingNode):
            if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
                return {}
            self.error(node, path, f"expected a mapping, got {_kind(node)}")
            return None
        known_list = list(known)
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, path, "keys must be plain names")
                continue
            key = str(key_node.value)
            sub = _join(path, key)
            if key in out:
                self.error(key_node, sub, "duplicate key")
                continue
            if known_list and key not in known_list:
                near = difflib.get_close_matches(key, known_list, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                self.error(key_node, sub, f"unknown key{hint}")
                continue
            out[key] = value_node
        return out

    def free_mapping(self, node: Node, path: str) -> dict[str, Node] | None:
        return self.mapping(node, path, ())

    def scalar(self, node: Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(node, path, f"expected an integer, got {_kind(node)}")
            return None
        if not lo <= value <= hi:
            self.error(node, path, f"must be between {lo} and {hi}, got {value}")
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            self.error(node, path, f"expected true or false, got {_kind(node)}")
            return None
        return value

    def string(self, node: Node, path: str, pattern: re.Pattern[str] | None = None,
               what: str = "") -> str | None:
        if not isinstance(node, ScalarNode) or node.tag.endswith(":null"):
            self.error(node, path, f"expected a string, got {_kind(node)}")
            return None
        value = str(node.value)
        if pattern is not None and not pattern.match(value):
            self.error(node, path, f"{what or 'invalid value'}: {value!r}")
            return None
        return value

    def choice(self, node: Node, path: str, choices: tuple[str, ...]) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        if value not in choices:
            near = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            self.error(node, path, f"must be one of {', '.join(choices)}, got {value!r}{hint}")
            return None
        return value

    def duration_ms(self, node: Node, path: str, lo_ms: int, hi_ms: int) -> int | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        ms: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            ms = value * 1000
        elif isinstance(value, str) and _DURATION.match(value.strip()):
            ms = sum(int(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(value))
        if ms is None:
            self.error(node, path, f"expected a duration such as 30s, 5m, 12h or 250ms, "
                       f"got {_kind(node)}")
            return None
        if not lo_ms <= ms <= hi_ms:
            self.error(node, path, f"must be between {_fmt_ms(lo_ms)} and {_fmt_ms(hi_ms)}, "
                       f"got {_fmt_ms(ms)}")
            return None
        return ms

    def number_list(self, node: Node, path: str) -> list[str]:
        """Numbers or prefixes, read as written (``00`` stays ``00`` even unquoted)."""
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"expected a list of numbers, got {_kind(node)}")
            return []
        out: list[str] = []
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            if not isinstance(item, ScalarNode) or item.tag.endswith(":null") or item.value == "":
                self.error(item, sub, f"expected a number, got {_kind(item)}")
                continue
            s = str(item.value).strip()
            if not re.fullmatch(r"[0-9A-Za-z+*#]{1,32}", s):
                self.error(item, sub, f"not a dialled number or prefix: {s!r}")
                continue
            if s in out:
                self.error(item, sub, f"{s!r} is listed twice")
                continue
            out.append(s)
        return out

    def reject(self, node: Node, path: str, default: Reject) -> Reject | None:
        m = self.mapping(node, path, ("code", "reason", "retry_after"))
        if m is None:
            return None
        code = default.code
        reason = default.reason
        retry_after = default.retry_after
        if "code" in m:
            code = self.integer(m["code"], f"{path}.code", 300, 699) or code
            if "reason" not in m:
                reason = _REASONS.get(code, reason)
            # another code is another answer: the default's Retry-After (meant for a 503
            # overload) is not carried over to, say, a 403 or a 486
            retry_after = None
        if "reason" in m:
            r = self.string(m["reason"], f"{path}.reason", re.compile(r"^[^\r\n\x00]{1,128}$"),
                            "a reason phrase is one line of 1 to 128 characters")
            reason = r if r is not None else reason
        if "retry_after" in m:
            if isinstance(m["retry_after"], ScalarNode) and m["retry_after"].tag.endswith(":null"):
                retry_after = None
            else:
                ra = self.integer(m["retry_after"], f"{path}.retry_after", 0, 86400)
                retry_after = ra if ra is not None else retry_after
        return Reject(code=code, reason=reason, retry_after=retry_after)

    # -- the document
    def policy(self, root: Node) -> Policy | None:
        top = self.mapping(root, "(document)", _TOP_KEYS)
        if top is None:
            return None
        for required in ("version", "namespace"):
            if required not in top:
                self.error(root, required, "required key is missing")
        if "version" in top:
            vnode = top["version"]
            version = self.scalar(vnode) if isinstance(vnode, ScalarNode) else None
            if version not in (1, 2) or isinstance(version, bool):
                self.error(top["version"], "version",
                           f"unsupported policy version {top['version'].value!r}; this policer "
                           "reads versions 1 and 2")
        namespace = ""
        if "namespace" in top:
            namespace = self.string(top["namespace"], "namespace", _NAMESPACE,
                                    "letters, digits, '_', '.', '-' only (1-64)") or ""

        number_source, attributes = self.call(top.get("call"))
        classes = self.classes(top.get("classes"))
        class_names = {c.name for c in classes}
        profiles = self.profiles(top.get("profiles"), attributes, class_names)
        default_reject = Reject()
        if "reject" in top:
            default_reject = self.reject(top["reject"], "reject", default_reject) or default_reject
        timezone = "UTC"
        if "timezone" in top:
            timezone = self.timezone(top["timezone"]) or timezone
        schedules = self.schedules(top.get("schedules"))
        limit_entries = self.limits(top.get("limits"), self.profile_names, default_reject,
                                    schedules)
        limits = {name: entries[0] for name, entries in limit_entries.items()}

        emergency_class: str | None = None
        bypass = True
        if "emergency" in top:
            m = self.mapping(top["emergency"], "emergency", ("class", "bypass")) or {}
            if "class" in m:
                emergency_class = self.string(m["class"], "emergency.class")
                if emergency_class is not None and emergency_class not in class_names:
                    self.unknown_ref(m["class"], "emergency.class", "class", emergency_class,
                                     class_names)
                    emergency_class = None
            if "bypass" in m:
                b = self.boolean(m["bypass"], "emergency.bypass")
                bypass = b if b is not None else bypass
        elif "emergency" in class_names:
            emergency_class = "emergency"
        for name, lim in limits.items():
            if lim.reserve_for_emergency and emergency_class is None:
                node = self.reserve_nodes.get(name, top["limits"])
                self.error(node, f"limits.{name}.reserve_for_emergency",
                           "needs an emergency class (emergency.class)")

        timeouts = Timeouts()
        if "timeouts" in top:
            m = self.mapping(top["timeouts"], "timeouts", ("early", "dialog", "max_duration")) or {}
            early = timeouts.early_ms
            dialog = timeouts.dialog_ms
            if "early" in m:
                early = self.duration_ms(m["early"], "timeouts.early", 1000, 86_400_000) or early
            if "dialog" in m:
                dialog = (self.duration_ms(m["dialog"], "timeouts.dialog", 1000, 7 * 86_400_000)
                          or dialog)
            md_default: int | None = None
            md_by_class: dict[str, int] = {}
            if "max_duration" in m:
                md_default, md_by_class = self.max_durations(m["max_duration"], class_names)
            timeouts = Timeouts(early_ms=early, dialog_ms=dialog, max_duration_ms=md_default,
                                max_duration_by_class=MappingProxyType(md_by_class))

        on_store_error: Literal["admit", "reject"] = "admit"
        if "on_store_error" in top:
            c = self.choice(top["on_store_error"], "on_store_error", ("admit", "reject"))
            on_store_error = "reject" if c == "reject" else "admit"
        store_timeout_ms = 50
        if "store_timeout" in top:
            store_timeout_ms = self.duration_ms(top["store_timeout"], "store_timeout", 1,
                                                10_000) or store_timeout_ms
        shadow = False
        if "shadow" in top:
            shadow = bool(self.boolean(top["shadow"], "shadow"))
        near = 0.8
        if "near_limit" in top:
            nnode = top["near_limit"]
            n = self.scalar(nnode) if isinstance(nnode, ScalarNode) else None
            if isinstance(n, int | float) and not isinstance(n, bool) and 0 < n <= 1:
                near = float(n)
            else:
                self.error(top["near_limit"], "near_limit", "expected a ratio above 0 and up to 1")

        nodes = Nodes()
        if "nodes" in top:
            m = self.mapping(top["nodes"], "nodes", ("lease", "renew", "on_node_loss")) or {}
            lease, renew = nodes.lease_ms, nodes.renew_ms
            if "lease" in m:
                lease = self.duration_ms(m["lease"], "nodes.lease", 1000, 86_400_000) or lease
            if "renew" in m:
                renew = self.duration_ms(m["renew"], "nodes.renew", 100, 3_600_000) or renew
            loss: Literal["release", "keep"] = nodes.on_node_loss
            if "on_node_loss" in m:
                c = self.choice(m["on_node_loss"], "nodes.on_node_loss", ("release", "keep"))
                loss = "keep" if c == "keep" else "release"
            if renew * 2 > lease:
                self.error(m.get("renew", top["nodes"]), "nodes.renew",
                           f"renew ({_fmt_ms(renew)}) must be at most half the lease "
                           f"({_fmt_ms(lease)}), or one late renewal loses every call")
            nodes = Nodes(lease_ms=lease, renew_ms=renew, on_node_loss=loss)
        pending = 10_000
        if "pending_queue" in top:
            pq = self.integer(top["pending_queue"], "pending_queue", 0, 10_000_000)
            pending = pq if pq is not None else pending
        cdr_keep = 100_000
        if "call_records" in top:
            cr = self.mapping(top["call_records"], "call_records", ("keep",)) or {}
            if "keep" in cr:
                keep = self.integer(cr["keep"], "call_records.keep", 0, 100_000_000)
                cdr_keep = keep if keep is not None else cdr_keep
        attempts_keep = 100_000
        if "attempts" in top:
            at = self.mapping(top["attempts"], "attempts", ("keep",)) or {}
            if "keep" in at:
                keep = self.integer(at["keep"], "attempts.keep", 0, 100_000_000)
                attempts_keep = keep if keep is not None else attempts_keep

        if self.errors:
            return None
        return Policy(
            namespace=namespace,
            number_source=number_source,
            attributes=MappingProxyType(attributes),
            classes=tuple(classes),
            profiles=tuple(profiles),
            limits=MappingProxyType(limits),
            emergency_class=emergency_class,
            emergency_bypass=bypass,
            timeouts=timeouts,
            reject=default_reject,
            on_store_error=on_store_error,
            store_timeout_ms=store_timeout_ms,
            shadow=shadow,
            near_limit_ratio=near,
            nodes=nodes,
            pending_queue=pending,
            call_records_keep=cdr_keep,
            attempts_keep=attempts_keep,
            timezone=timezone,
            schedules=MappingProxyType(schedules),
            limit_entries=MappingProxyType(limit_entries),
            source=self.source,
            version=int(self.scalar(top["version"])),
        )

    def unknown_ref(self, node: Node, path: str, what: str, name: str,
                    known: Iterable[str]) -> None:
        near = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        self.error(node, path, f"unknown {what} {name!r}{hint}")

    def source_ref(self, node: Node, path: str) -> str | None:
        """An attribute source: a built-in one or ``header:<Name>``."""
        s = self.string(node, path)
        if s is None:
            return None
        if s.startswith("header:"):
            name = s[7:]
            if not _HEADER.match(name):
                self.error(node, path, f"not a SIP header name: {name!r}")
                return None
            return "header:" + name.lower()
        if s not in ATTRIBUTE_SOURCES:
            near = difflib.get_close_matches(s, ATTRIBUTE_SOURCES, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            self.error(node, path, f"unknown attribute source {s!r}{hint}; use one of "
                       f"{', '.join(ATTRIBUTE_SOURCES)} or header:<Name>")
            return None
        return s

    def call(self, node: Node | None) -> tuple[str, dict[str, str]]:
        number = "ruri_user"
        attributes: dict[str, str] = {}
        if node is None:
            return number, attributes
        m = self.mapping(node, "call", ("number", "attributes")) or {}
        if "number" in m:
            number = self.choice(m["number"], "call.number", ("ruri_user", "to_user")) or number
        if "attributes" in m:
            attrs = self.free_mapping(m["attributes"], "call.attributes") or {}
            for name, value_node in attrs.items():
                path = f"call.attributes.{name}"
                if not _NAME.match(name):
                    self.error(value_node, path, "attribute names are letters, digits, '_', '-'")
                    continue
                if name in ATTRIBUTE_SOURCES:
                    self.error(value_node, path, "shadows a built-in attribute of the same name")
                    continue
                src = self.source_ref(value_node, path)
                if src is not None:
                    attributes[name] = src
        return number, attributes

    def classes(self, node: Node | None) -> list[NumberClass]:
        if node is None:
            return []
        m = self.free_mapping(node, "classes") or {}
        out: list[NumberClass] = []
        seen_numbers: dict[str, str] = {}
        seen_prefixes: dict[str, str] = {}
        default_of: str | None = None
        for name, cnode in m.items():
            path = f"classes.{name}"
            if not _NAME.match(name):
                self.error(cnode, path, "class names are letters, digits, '_', '-'")
                continue
            c = self.mapping(cnode, path, ("numbers", "prefixes", "default"))
            if c is None:
                continue
            numbers = self.number_list(c["numbers"], f"{path}.numbers") if "numbers" in c else []
            prefixes = (self.number_list(c["prefixes"], f"{path}.prefixes")
                        if "prefixes" in c else [])
            default = ("default" in c
                       and bool(self.boolean(c["default"], f"{path}.default")))
            for kind, items, seen, key in (("number", numbers, seen_numbers, "numbers"),
                                           ("prefix", prefixes, seen_prefixes, "prefixes")):
                for i, item in enumerate(items):
                    if item in seen:
                        self.error(c[key], f"{path}.{key}[{i}]",
                                   f"{kind} {item!r} is already in class {seen[item]!r}")
                    seen[item] = name
            if default:
                if default_of is not None:
                    self.error(c["default"], f"{path}.default",
                               f"class {default_of!r} is already the default")
                default_of = name
            if not (numbers or prefixes or default):
                self.error(cnode, path, "a class needs numbers, prefixes or default: true")
            out.append(NumberClass(name, frozenset(numbers), tuple(prefixes), default))
        return out

    def profiles(self, node: Node | None, attributes: Mapping[str, str],
                 class_names: set[str]) -> list[Profile]:
        if node is None:
            return []
        m = self.free_mapping(node, "profiles") or {}
        out: list[Profile] = []
        for name, pnode in m.items():
            path = f"profiles.{name}"
            if not _NAME.match(name):
                self.error(pnode, path, "profile names are letters, digits, '_', '-'")
                continue
            self.profile_names.add(name)
            p = self.mapping(pnode, path, ("value", "when"))
            if p is None:
                continue
            value: str | None = None
            if "value" in p:
                vnode = p["value"]
                raw = self.string(vnode, f"{path}.value")
                if raw is None:
                    continue
                if raw in attributes:
                    value = attributes[raw]
                elif raw in ATTRIBUTE_SOURCES or raw.startswith("header:"):
                    value = self.source_ref(vnode, f"{path}.value")
                    if value is None:
                        continue
                else:
                    known = list(attributes) + list(ATTRIBUTE_SOURCES)
                    near = difflib.get_close_matches(raw, known, n=1)
                    hint = (f" (did you mean '{near[0]}'?)" if near else
                            f"; use one of {', '.join(known)}, or header:<Name> "
                            "(define others under call.attributes)")
                    self.error(vnode, f"{path}.value", f"unknown attribute {raw!r}{hint}")
                    continue
            when: frozenset[str] | None = None
            if "when" in p:
                w = self.mapping(p["when"], f"{path}.when", ("class",)) or {}
                if "class" in w:
                    cnode = w["class"]
                    names: list[str] = []
                    if isinstance(cnode, SequenceNode):
                        for i, item in enumerate(cnode.value):
                            s = self.string(item, f"{path}.when.class[{i}]")
                            if s is not None:
                                names.append(s)
                    else:
                        s = self.string(cnode, f"{path}.when.class")
                        if s is not None:
                            names.append(s)
                    for n in names:
                        if n not in class_names:
                            self.unknown_ref(cnode, f"{path}.when.class", "class", n, class_names)
                    when = frozenset(names)
            out.append(Profile(name=name, value=value, when_classes=when))
        return out

    def timezone(self, node: Node) -> str | None:
        name = self.string(node, "timezone")
        if name is None:
            return None
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            known = sorted(zoneinfo.available_timezones())
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else " (an IANA name such as " \
                "Europe/Berlin)"
            self.error(node, "timezone", f"unknown time zone {name!r}{hint}")
            return None
        return name

    def schedules(self, node: Node | None) -> dict[str, Schedule]:
        if node is None:
            return {}
        m = self.free_mapping(node, "schedules") or {}
        out: dict[str, Schedule] = {}
        for name, snode in m.items():
            path = f"schedules.{name}"
            if not _NAME.match(name):
                self.error(snode, path, "schedule names are letters, digits, '_', '-'")
                continue
            sm = self.mapping(snode, path, ("days", "hours"))
            if sm is None:
                continue
            days: set[int] = set(range(7))
            ok = True
            if "days" in sm:
                dnode = sm["days"]
                items = dnode.value if isinstance(dnode, SequenceNode) else [dnode]
                days = set()
                for i, item in enumerate(items):
                    sub = f"{path}.days[{i}]" if isinstance(dnode, SequenceNode) \
                        else f"{path}.days"
                    d = self.choice(item, sub, DAYS)
                    if d is None:
                        ok = False
                    elif DAYS.index(d) in days:
                        self.error(item, sub, f"{d!r} is listed twice")
                    else:
                        days.add(DAYS.index(d))
                if not days and ok:
                    self.error(dnode, f"{path}.days", "a schedule needs at least one day")
                    ok = False
            start, end = 0, 1440
            if "hours" in sm:
                hours = self.hours(sm["hours"], f"{path}.hours")
                if hours is None:
                    ok = False
                else:
                    start, end = hours
            if ok:
                out[name] = Schedule(name, frozenset(days), start, end % 1440)
        return out

    def hours(self, node: Node, path: str) -> tuple[int, int] | None:
        text = self.string(node, path)
        if text is None:
            return None
        match = _HOURS.match(text)
        if match is None:
            self.error(node, path, f"expected hours as HH:MM-HH:MM (e.g. 08:00-18:00 or "
                       f"22:00-06:00 across midnight), got {text!r}")
            return None
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            self.error(node, path, f"not a time of day in {text!r} (00:00 to 24:00)")
            return None
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end % 1440 and not (start == 0 and end == 1440):
            self.error(node, path, f"{text!r} is empty: start and end are the same time "
                       "(use 00:00-24:00 for the whole day)")
            return None
        return start, end

    def max_durations(self, node: Node, class_names: set[str]
                      ) -> tuple[int | None, dict[str, int]]:
        """``timeouts.max_duration``: a duration, or ``{default: D, CLASS: D, ...}``."""
        path = "timeouts.max_duration"
        if not isinstance(node, MappingNode):
            return self.duration_ms(node, path, 1000, 7 * 86_400_000), {}
        m = self.free_mapping(node, path) or {}
        default: int | None = None
        by_class: dict[str, int] = {}
        for name, dnode in m.items():
            if name != "default" and name not in class_names:
                self.unknown_ref(dnode, f"{path}.{name}", "class", name,
                                 class_names | {"default"})
                continue
            ms = self.duration_ms(dnode, f"{path}.{name}", 1000, 7 * 86_400_000)
            if ms is None:
                continue
            if name == "default":
                default = ms
            else:
                by_class[name] = ms
        return default, by_class

    def rate(self, node: Node, path: str) -> Rate | None:
        m = self.mapping(node, path, ("max", "per", "burst"))
        if m is None:
            return None
        for required in ("max", "per"):
            if required not in m:
                self.error(node, f"{path}.{required}", "required key is missing")
        if "max" not in m or "per" not in m:
            return None
        mx = self.integer(m["max"], f"{path}.max", 1, 1_000_000)
        per = self.rate_period(m["per"], f"{path}.per")
        burst = mx
        if "burst" in m:
            burst = self.integer(m["burst"], f"{path}.burst", 1, 1_000_000)
        if mx is None or per is None or burst is None:
            return None
        if per * 1000 // mx < 1:
            self.error(m["max"], f"{path}.max", f"{mx} calls per {_fmt_ms(per)} is more than "
                       "one per microsecond")
            return None
        return Rate(mx, per, burst)

    def rate_period(self, node: Node, path: str) -> int | None:
        """A rate's ``per``: a duration (``1s``, ``10s``, ``1m``), or a bare unit (``s``)."""
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, str) and value.strip() in _UNIT_MS:
            return _UNIT_MS[value.strip()]
        return self.duration_ms(node, path, 1, 86_400_000)

    def windows(self, node: Node, path: str) -> tuple[Window, ...] | None:
        items = node.value if isinstance(node, SequenceNode) else [node]
        out: list[Window] = []
        ok = True
        for i, item in enumerate(items):
            sub = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            m = self.mapping(item, sub, ("max", "per"))
            if m is None:
                ok = False
                continue
            for required in ("max", "per"):
                if required not in m:
                    self.error(item, f"{sub}.{required}", "required key is missing")
                    ok = False
            if "max" not in m or "per" not in m:
                continue
            mx = self.integer(m["max"], f"{sub}.max", 0, 1_000_000_000)
            per = self.choice(m["per"], f"{sub}.per", tuple(WINDOWS))
            if mx is None or per is None:
                ok = False
                continue
            if any(w.per == per for w in out):
                self.error(m["per"], f"{sub}.per", f"a {per} window is already listed")
                ok = False
                continue
            out.append(Window(mx, per))
        return tuple(sorted(out, key=lambda w: WINDOWS[w.per])) if ok else None

    def limits(self, node: Node | None, profile_names: set[str], default_reject: Reject,
               schedules: Mapping[str, Schedule]) -> dict[str, tuple[Limit, ...]]:
        if node is None:
            return {}
        m = self.free_mapping(node, "limits") or {}
        out: dict[str, tuple[Limit, ...]] = {}
        for name, lnode in m.items():
            path = f"limits.{name}"
            if name not in profile_names:
                self.unknown_ref(lnode, path, "profile", name, profile_names)
                continue
            if isinstance(lnode, SequenceNode):
                entries: list[Limit] = []
                nodes: list[Node] = []
                if not lnode.value:
                    self.error(lnode, path, "a list of limits needs at least one entry")
                for i, item in enumerate(lnode.value):
                    lim = self.limit(item, f"{path}[{i}]", name, default_reject, schedules)
                    if lim is not None:
                        entries.append(lim)
                        nodes.append(item)
                self.reachable(entries, nodes, path, schedules)
                if entries and len(entries) == len(lnode.value):
                    out[name] = tuple(entries)
                continue
            lim = self.limit(lnode, path, name, default_reject, schedules)
            if lim is not None:
                out[name] = (lim,)
        return out

    def reachable(self, entries: list[Limit], nodes: list[Node], path: str,
                  schedules: Mapping[str, Schedule]) -> None:
        """Entries of a scheduled list: first match wins, so an entry whose hours earlier
        entries already cover never applies, and two scheduled entries that share hours
        leave the later one out there."""
        covered: set[int] = set()
        for i, (lim, node) in enumerate(zip(entries, nodes, strict=True)):
            sub = f"{path}[{i}]"
            if lim.schedule is None:
                if i < len(entries) - 1:
                    self.error(nodes[i + 1], f"{path}[{i + 1}]",
                               f"unreachable: entry {i} has no schedule and always applies "
                               "(put entries without a schedule last)")
                    return
                if len(covered) == _WEEK_MIN:
                    self.error(node, sub, "unreachable: the schedules of the entries above "
                               "cover the whole week")
                return
            mine = schedules[lim.schedule].minutes()
            if mine <= covered:
                self.error(node, sub, f"unreachable: schedule {lim.schedule!r} is covered "
                           "by the entries above")
            elif mine & covered:
                self.error(node, sub, f"schedule {lim.schedule!r} overlaps an entry above "
                           "(the first match wins): make the schedules disjoint")
            covered |= mine

    def limit(self, lnode: Node, path: str, name: str, default_reject: Reject,
              schedules: Mapping[str, Schedule]) -> Limit | None:
        lm = self.mapping(lnode, path, _LIMIT_KEYS)
        if lm is None:
            return None
        if not any(k in lm for k in ("max", "rate", "calls", "max_duration")):
            self.error(lnode, f"{path}.max", "required key is missing")
            return None
        mx: int | None = -1
        if "max" in lm:
            mx = self.integer(lm["max"], f"{path}.max", 0, 10_000_000)
        reserve = 0
        if "reserve_for_emergency" in lm:
            r = self.integer(lm["reserve_for_emergency"], f"{path}.reserve_for_emergency", 0,
                             10_000_000)
            self.reserve_nodes[name] = lm["reserve_for_emergency"]
            if r is not None and mx is not None and r > mx:
                if mx < 0:
                    self.error(lm["reserve_for_emergency"], f"{path}.reserve_for_emergency",
                               "needs a max of concurrent calls to reserve slots of")
                else:
                    self.error(lm["reserve_for_emergency"], f"{path}.reserve_for_emergency",
                               f"cannot exceed max ({mx})")
            reserve = r or 0
        rej = default_reject
        if "reject" in lm:
            rej = self.reject(lm["reject"], f"{path}.reject", default_reject) or rej
        rate_rej: Reject | None = None
        if "rate_reject" in lm:
            rate_rej = self.reject(lm["rate_reject"], f"{path}.rate_reject", rej)
        shadow = False
        if "shadow" in lm:
            shadow = bool(self.boolean(lm["shadow"], f"{path}.shadow"))
        rate = self.rate(lm["rate"], f"{path}.rate") if "rate" in lm else None
        calls: tuple[Window, ...] | None = ()
        if "calls" in lm:
            calls = self.windows(lm["calls"], f"{path}.calls")
        duration: int | None = None
        if "max_duration" in lm:
            duration = self.duration_ms(lm["max_duration"], f"{path}.max_duration", 1000,
                                        7 * 86_400_000)
        if "rate_reject" in lm and "rate" not in lm:
            self.error(lm["rate_reject"], f"{path}.rate_reject", "answers rate rejections, "
                       "but this limit has no rate")
        schedule: str | None = None
        if "schedule" in lm:
            schedule = self.string(lm["schedule"], f"{path}.schedule")
            if schedule is not None and schedule not in schedules:
                self.unknown_ref(lm["schedule"], f"{path}.schedule", "schedule", schedule,
                                 schedules)
                schedule = None
        if mx is None or calls is None or ("rate" in lm and rate is None):
            return None
        return Limit(profile=name, max=mx, reserve_for_emergency=reserve, reject=rej,
                     shadow=shadow, rate=rate, calls=calls, max_duration_ms=duration,
                     rate_reject=rate_rej, schedule=schedule)


_REASONS = {
    403: "Forbidden",
    480: "Temporarily Unavailable",
    486: "Busy Here",
    503: "Service Unavailable",
    600: "Busy Everywhere",
    603: "Decline",
}


def _join(path: str, key: str) -> str:
    return key if path == "(document)" else f"{path}.{key}"


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        tag = node.tag.rsplit(":", 1)[-1]
        if tag == "null":
            return "nothing"
        return f"{tag} {node.value!r}"
    return "something else"


def _fmt_ms(ms: int) -> str:
    if ms == 0:
        return "0ms"
    for unit in ("d", "h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"
