"""A point-in-time view of every profile of a policy, read from the store:
counts, limits (live limits applied), utilisation, the busiest values of
valued profiles, and the cluster-wide counters. Shared by ``policer top``,
the Prometheus exporter and the simulation, so all three show the same
numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policer.calendar import LocalClock
from policer.compile import compile_policy
from policer.policy import Limit, Policy
from policer.store.base import AdminStore

__all__ = ["ProfileRow", "Snapshot", "take_snapshot"]


@dataclass(frozen=True, slots=True)
class ProfileRow:
    """One profile, or one value of a valued profile."""

    profile: str
    value: str | None  # None for a no-value profile, or the whole of a valued one
    count: int
    limit: int | None  # effective max for this row, None when only counted
    shadow: bool = False
    #: the rate's owed calls over its burst (None: no rate); calendar counts per window
    rate_usage: float | None = None
    calls: Mapping[str, int] = field(default_factory=dict)
    #: calendar caps per window (the policy's, live caps applied for values)
    calls_max: Mapping[str, int] = field(default_factory=dict)

    @property
    def utilization(self) -> float | None:
        if self.limit is None:
            return None
        if self.limit == 0:
            return 1.0 if self.count else 0.0
        return self.count / self.limit


@dataclass(frozen=True, slots=True)
class Snapshot:
    rows: tuple[ProfileRow, ...]  # no-value profiles and the total of each valued one
    values: tuple[ProfileRow, ...]  # per value: the busiest and the listed ones
    stats: Mapping[str, int]
    decisions: Mapping[tuple[str, str], int]
    ended: Mapping[str, int]
    #: the policy the store decides by (None: none loaded) and that of the policy file
    policy_hash: str | None = None
    policy_file_hash: str = ""
    #: each node holding a lease: its clock minus the store's (ms), as it measured it
    skews: Mapping[str, int] = field(default_factory=dict)
    #: per hierarchy level, the parent of each value shown of the profile below it
    #: (live parents over the file's)
    parents: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def decided(self, result: str, profile: str) -> int:
        return self.decisions.get((result, profile), 0)


def take_snapshot(policy: Policy, store: AdminStore, top: int = 5,
                  listed: Mapping[str, Iterable[str]] | None = None) -> Snapshot:
    """Read the store once for every profile of ``policy``.

    For valued profiles, the ``top`` busiest values and every value in
    ``listed[profile]`` get a row of their own (bounded label cardinality for
    the exporter); the profile's own row holds the sum over all values. A gateway
    profile (its value is where calls are sent: few values) shows every gateway that
    has calls or limits of its own. For each hierarchy level, the parents of the values
    shown of the level below are read too (``Snapshot.parents``).
    """
    rows: list[ProfileRow] = []
    values: list[ProfileRow] = []
    # the entries that apply now (scheduled limits), by the store's clock
    minute = LocalClock(policy.timezone).minute_of_week(store.now_ms()) if policy.timed else 0
    for p in policy.profiles:
        limit = policy.limit_at(p.name, minute)
        default_max = limit.max if limit and limit.max >= 0 else None
        shadow = bool(limit and (limit.shadow or policy.shadow))
        if not p.valued:
            rows.append(_row(store, p.name, limit, shadow, None, store.profile_size(p.name),
                             default_max))
            continue
        counts = store.profile_values(p.name)
        rows.append(ProfileRow(p.name, None, sum(counts.values()), None, shadow))
        own = policy.value_entries.get(p.name, {})
        gateway = policy.root_source(p) == "gateway"
        live_limits = store.limits(p.name) if limit or own or gateway else {}
        chosen = sorted(counts, key=lambda v: (-counts[v], v))
        if gateway:
            chosen += [v for v in live_limits if v not in counts]
        else:
            chosen = chosen[:max(0, top)]
        for v in (*(listed or {}).get(p.name, ()), *own):
            if v not in chosen:
                chosen.append(v)
        for v in chosen:
            n = counts[v] if v in counts else store.profile_size(p.name, v)
            vlimit = policy.limit_at(p.name, minute, v) if v in own else limit
            vmax = vlimit.max if vlimit and vlimit.max >= 0 else None
            vshadow = bool(vlimit and (vlimit.shadow or policy.shadow))
            mx = live_limits.get(v, vmax)
            values.append(_row(store, p.name, vlimit, vshadow, v, n, mx))
    leased = store.nodes()
    skews = {n: ms for n, (ms, _) in store.node_skews().items() if n in leased}
    parents: dict[str, dict[str, str]] = {}
    for p in policy.profiles:
        if p.parent_of is not None:
            live = store.parents(p.name)
            known = {**policy.parents.get(p.name, {}), **live}
            parents[p.name] = {v.value: known[v.value] for v in values
                               if v.profile == p.parent_of and v.value in known}
    return Snapshot(tuple(rows), tuple(values), store.stats(), store.decisions(), store.ended(),
                    store.loaded_hash(), compile_policy(policy).policy_hash, skews, parents)


def _row(store: AdminStore, profile: str, limit: Limit | None, shadow: bool, value: str | None,
         count: int, mx: int | None) -> ProfileRow:
    """A row, with rate and calendar usage when the limit that applies has them."""
    if limit is None or (limit.rate is None and not limit.calls):
        return ProfileRow(profile, value, count, mx, shadow)
    u = store.usage(profile, value)
    return ProfileRow(profile, value, count, mx, shadow, u.rate, u.calls,
                      {w.per: w.max for w in limit.calls})
