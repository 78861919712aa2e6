"""A point-in-time view of every profile of a policy, read from the store:
counts, limits (live limits applied), utilisation, the busiest values of
valued profiles, and the cluster-wide counters. Shared by ``policer top``,
the Prometheus exporter and the simulation, so all three show the same
numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from policer.compile import compile_policy
from policer.policy import Policy
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

    def decided(self, result: str, profile: str) -> int:
        return self.decisions.get((result, profile), 0)


def take_snapshot(policy: Policy, store: AdminStore, top: int = 5,
                  listed: Mapping[str, Iterable[str]] | None = None) -> Snapshot:
    """Read the store once for every profile of ``policy``.

    For valued profiles, the ``top`` busiest values and every value in
    ``listed[profile]`` get a row of their own (bounded label cardinality for
    the exporter); the profile's own row holds the sum over all values.
    """
    rows: list[ProfileRow] = []
    values: list[ProfileRow] = []
    for p in policy.profiles:
        limit = policy.limits.get(p.name)
        default_max = limit.max if limit else None
        shadow = bool(limit and (limit.shadow or policy.shadow))
        if not p.valued:
            rows.append(ProfileRow(p.name, None, store.profile_size(p.name), default_max, shadow))
            continue
        counts = store.profile_values(p.name)
        rows.append(ProfileRow(p.name, None, sum(counts.values()), None, shadow))
        live_limits = store.limits(p.name) if limit else {}
        chosen = sorted(counts, key=lambda v: (-counts[v], v))[:max(0, top)]
        for v in (listed or {}).get(p.name, ()):
            if v not in chosen:
                chosen.append(v)
        for v in chosen:
            n = counts[v] if v in counts else store.profile_size(p.name, v)
            mx = live_limits.get(v, default_max)
            values.append(ProfileRow(p.name, v, n, mx, shadow))
    return Snapshot(tuple(rows), tuple(values), store.stats(), store.decisions(), store.ended(),
                    store.loaded_hash(), compile_policy(policy).policy_hash)
