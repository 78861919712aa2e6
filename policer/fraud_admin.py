"""The fraud guard's operations (``policer blocks list|lift``, ``policer fraud status``):
the values blocked now, a block lifted before it ends (audited, like a live limit), and
per rule the values closest to their thresholds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from policer.log import get_logger
from policer.policy import Policy
from policer.policy.model import FRAUD_STATS
from policer.store import Store

__all__ = ["BlockLift", "FraudError", "lift", "rules_of_key", "status"]


class FraudError(ValueError):
    """No fraud rule has that key."""


@dataclass(frozen=True, slots=True)
class BlockLift:
    """A value's blocks lifted: by which rules (those that had one in force)."""

    key: str
    value: str
    rules: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "lifted": list(self.rules)}


def rules_of_key(policy: Policy, key: str) -> list[str]:
    """The rules whose key is ``key`` (as written in the policy); raises FraudError."""
    rules = [r.name for r in policy.fraud if r.key == key]
    if not rules:
        keys = ", ".join(sorted({r.key for r in policy.fraud})) or "none"
        raise FraudError(f"no fraud rule has the key {key!r}; the policy's keys: {keys}")
    return rules


def lift(policy: Policy, store: Store, key: str, value: str) -> BlockLift:
    """Lift the blocks of ``value`` by every rule keyed on ``key``, audited."""
    lifted = tuple(store.fraud_lift(rules_of_key(policy, key), value))
    get_logger("policer.audit").info(
        "block_lifted", namespace=policy.namespace, key=key, value=value,
        rules=list(lifted), user=os.environ.get("SUDO_USER") or os.environ.get("USER", ""))
    return BlockLift(key, value, lifted)


def status(policy: Policy, store: Store, top: int = 10) -> list[dict[str, Any]]:
    """Per rule, the ``top`` values closest to a threshold in their current window: each
    statistic's count against its levels, the nearest ratio first (``concurrent``: the
    key profile's live calls)."""
    out: list[dict[str, Any]] = []
    blocked = {(b.rule, b.value): b.until_ms for b in store.fraud_blocks()}
    for rule in policy.fraud:
        rows: list[dict[str, Any]] = []
        live = store.profile_values(rule.profile) if rule.profile else {}
        states = store.fraud_states(rule.name)
        for value in set(states) | ({v for v in live if live[v]}
                                    if "concurrent" in rule.stats else set()):
            st = states.get(value)
            stats = st.stats(live.get(value, 0)) if st is not None else \
                {"concurrent": live.get(value, 0)}
            near = 0.0
            shown: dict[str, Any] = {}
            for stat in FRAUD_STATS:
                t = rule.stats.get(stat)
                if t is None:
                    continue
                n = stats.get(stat, 0)
                top_level = t.critical if t.critical is not None else t.warning
                if top_level:
                    near = max(near, n / top_level)
                shown[stat] = {"count": n, "warning": t.warning, "critical": t.critical}
            rows.append({"value": value, "closest": round(near, 3), "stats": shown,
                         "blocked_until": blocked.get((rule.name, value))})
        rows.sort(key=lambda r: (-r["closest"], r["value"]))
        out.append({"rule": rule.name, "key": rule.key, "window": rule.per,
                    "shadow": rule.shadow, "values": rows[:top]})
    return out
