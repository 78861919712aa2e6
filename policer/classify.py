"""Classification: a :class:`~policer.call.Call` to its number class and its
profile memberships. Pure: no I/O, no clock, no SIP parsing.

A :class:`Classifier` is built once per policy (prefix tables, profile plans)
and then answers each call with a few dictionary look-ups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

from policer.call import Call
from policer.policy import Policy

__all__ = ["Classification", "Classifier", "Member", "ParentOf", "parse_ip"]

#: The parent registered for a value of a hierarchy level: (level profile, the value of
#: the profile it is the parent of) -> the parent, None: none registered.
ParentOf = Callable[[str, str], "str | None"]


class Member(NamedTuple):
    """A profile (and value) a dialog joins, with the limit that applies to it.

    ``max`` is -1 when the profile is only counted. ``reserve`` slots of ``max``
    are kept for emergency calls. A ``shadow`` limit is evaluated and reported
    but never rejects.
    """

    profile: str
    value: str | None = None
    max: int = -1
    reserve: int = 0
    shadow: bool = False

    def label(self) -> str:
        return self.profile if self.value is None else f"{self.profile}={self.value}"


@dataclass(frozen=True, slots=True)
class Classification:
    """A call's dialled number, its class, and the profiles it joins (in policy order)."""

    number: str
    number_class: str | None
    emergency: bool
    members: tuple[Member, ...]
    #: where the call comes from (``directions``, by its source IP); None: no direction
    direction: str | None = None
    #: a hierarchy level (``on_missing_parent: reject``) whose parent of the call's value
    #: is unknown: the call is rejected by it
    missing_parent: str | None = None


def parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """A source IP as the proxy reports it (``[...]`` around an IPv6 address and a
    ``%zone`` after it are dropped; an IPv4-mapped IPv6 address is its IPv4 address);
    None when it is no address. The library's ``parse_ip`` reads the same strings."""
    if len(text) > 64:
        return None
    if text[:1] == "[" and text[-1:] == "]":
        text = text[1:-1]
    if ":" in text:
        text = text.partition("%")[0]
    if not text.isascii():
        return None
    try:
        addr = ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Classifier:
    """Maps calls to number classes (exact numbers first, then the longest prefix,
    then the default class) and to memberships with their limits."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._exact: dict[str, str] = {}
        self._prefix: dict[str, str] = {}
        self._default: str | None = None
        for c in policy.classes:
            for n in c.numbers:
                self._exact[n] = c.name
            for p in c.prefixes:
                self._prefix[p] = c.name
            if c.default:
                self._default = c.name
        self._lengths = sorted({len(p) for p in self._prefix}, reverse=True)
        plan = []
        for prof in policy.profiles:
            limit = policy.limits.get(prof.name)
            if limit is None:
                template = Member(prof.name)
            else:
                template = Member(prof.name, None, limit.max, limit.reserve_for_emergency,
                                  policy.shadow or limit.shadow)
            plan.append((prof.name, prof.value, prof.when_classes, prof.when_directions,
                         template))
        self._plan = tuple(plan)
        #: hierarchy levels: profile -> the profile it is the parent of
        self._levels = {p.name: p.parent_of for p in policy.profiles
                        if p.parent_of is not None}
        self._sources = {p.name: p.value for p in policy.profiles if p.value is not None}
        self._reject_missing = {p.name for p in policy.profiles
                                if p.on_missing_parent == "reject"}
        #: the profiles joined per attempt (their value is where the call is sent)
        self._gateway = frozenset(p.name for p in policy.profiles
                                  if policy.root_source(p) == "gateway")
        self._default_direction = next((d.name for d in policy.directions if d.default),
                                       None)
        self._networks = tuple((net, d.name) for d in policy.directions
                               for net in d.networks)

    @property
    def gateway_profiles(self) -> frozenset[str]:
        """The profiles joined per attempt: their value is where the call is sent."""
        return self._gateway

    def direction(self, source_ip: str) -> str | None:
        """The call's direction: the first listed direction with a network holding its
        source IP, else the default direction (None: the policy has none)."""
        if not self._networks:
            return self._default_direction
        addr = parse_ip(source_ip)
        if addr is not None:
            for net, name in self._networks:
                if addr in net:
                    return name
        return self._default_direction

    def number_class(self, number: str) -> str | None:
        """The class of a dialled number, or None when nothing matches and there is no default."""
        found = self._exact.get(number)
        if found is not None:
            return found
        prefix = self._prefix
        for n in self._lengths:
            if len(number) >= n:
                found = prefix.get(number[:n])
                if found is not None:
                    return found
        return self._default

    def classify(self, call: Call, parent: ParentOf | None = None) -> Classification:
        """The call's class, direction and memberships. ``parent(profile, value)``: the
        parent registered for a value (the store's live parents, then the file's); a
        hierarchy level's value comes from it (without it, levels join nothing)."""
        number = call.attribute(self.policy.number_source)
        cls = self.number_class(number)
        direction = self.direction(call.source_ip) if self.policy.directions else None
        members, missing = self._members(cls, direction, call.attribute, parent, False)
        emergency = cls is not None and cls == self.policy.emergency_class
        return Classification(number, cls, emergency, members, direction, missing)

    def egress(self, number_class: str | None, source_ip: str, gateway: str,
               parent: ParentOf | None = None) -> tuple[tuple[Member, ...], str | None]:
        """The memberships a call of this class from this source IP takes at ``gateway``
        (the profiles whose value is where the call is sent, and the levels above them),
        and the level whose parent is unknown when the call is to be refused for it."""
        direction = self.direction(source_ip) if self.policy.directions else None
        return self._members(number_class, direction,
                             lambda s: gateway if s == "gateway" else "", parent, True)

    def _members(self, cls: str | None, direction: str | None,
                 attribute: Callable[[str], str], parent: ParentOf | None, gw: bool
                 ) -> tuple[tuple[Member, ...], str | None]:
        values: dict[str, str | None] = {}
        missing: list[str] = []

        def value_of(name: str, depth: int = 0) -> str | None:
            if name in values:
                return values[name]
            source = self._sources.get(name)
            v: str | None = attribute(source) if source is not None else None
            child_profile = self._levels.get(name)
            if child_profile is not None:
                child = value_of(child_profile, depth + 1) if depth < 64 else None
                v = parent(name, child) if parent is not None and child else None
            values[name] = v or None
            return v or None

        members: list[Member] = []
        for name, source, when, when_dir, template in self._plan:
            if when is not None and cls not in when:
                continue
            if when_dir is not None and direction not in when_dir:
                continue
            if gw and name not in self._gateway:
                continue
            if source is None and name not in self._levels:
                members.append(template)
                continue
            value = value_of(name)
            if value:  # calls without a value join no count of that profile
                members.append(template._replace(value=value))
            elif name in self._reject_missing and values.get(self._levels[name]):
                missing.append(name)  # a value whose parent is unknown
        return tuple(members), missing[0] if missing and parent is not None else None
