"""Live limits: per-value limits operators set at run time (``policer limits``) over
a policy's store, which win over the policy's own for that value until unset: a max of
concurrent calls, a call rate, a calendar window's cap. Every change is audited: one
``live_limit_changed`` event on the ``policer.audit`` logger, with the old and the new
limit, the policy's default and the user who made it.

What cannot be a live limit raises :class:`LiveLimitError` with the reason for the
operator (the command line adds the option it came from).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from policer.log import get_logger
from policer.policy import Policy, Rate
from policer.store import Store

__all__ = ["LimitChange", "LimitReading", "LiveLimitError", "default_max", "read",
           "set_calls", "set_max", "set_rate", "table", "valued_profile", "window_max"]


class LiveLimitError(ValueError):
    """A request that cannot be a live limit (the message says why)."""


@dataclass(frozen=True, slots=True)
class LimitReading:
    """One value's max of concurrent calls: its live one, the policy's, the one in force."""

    profile: str
    value: str
    live: int | None
    default: int | None
    effective: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "value": self.value, "live": self.live,
                "default": self.default, "effective": self.effective}


@dataclass(frozen=True, slots=True)
class LimitChange:
    """A live limit set or unset: ``kind`` None for a max of concurrent calls, else
    ``rate`` or ``calls``; ``old``/``new`` None: none (the policy's ``default``)."""

    profile: str
    value: str
    kind: str | None
    old: object
    new: object
    default: object

    def as_dict(self) -> dict[str, Any]:
        kind = {} if self.kind is None else {"kind": self.kind}
        return {"profile": self.profile, "value": self.value, **kind, "old": self.old,
                "new": self.new, "default": self.default}


def valued_profile(policy: Policy, profile: str) -> None:
    """Raise unless ``profile`` (one of the policy's) has a value: live limits are per
    value."""
    p = policy.profile(profile)
    if p is not None and not p.valued:
        raise LiveLimitError(f"profile {profile!r} has no value: live limits are per value "
                             "(change its limit in the policy)")


def default_max(policy: Policy, profile: str, value: str | None = None) -> int | None:
    """The policy's max of concurrent calls for a profile, or for one of its values
    (``limits.PROFILE.values``) (None: no limit)."""
    es = policy.entries(profile, value)
    return es[0].max if es and es[0].max >= 0 else None


def table(store: Store, profile: str) -> dict[str, int]:
    """Every live max of a profile's values."""
    return store.limits(profile)


def read(policy: Policy, store: Store, profile: str, value: str) -> LimitReading:
    """One value's max of concurrent calls, live and in force."""
    live = store.limit_get(profile, value)
    default = default_max(policy, profile, value)
    return LimitReading(profile, value, live, default, live if live is not None else default)


def set_max(policy: Policy, store: Store, profile: str, value: str, maximum: int | None
            ) -> LimitChange:
    """Set (None: unset) a value's live max of concurrent calls, audited."""
    if maximum is None:
        old = store.limit_unset(profile, value)
    else:
        old = store.limit_set(profile, value, maximum)
    change = LimitChange(profile, value, None, old, maximum,
                         default_max(policy, profile, value))
    _audit(policy, change)
    return change


def set_rate(policy: Policy, store: Store, profile: str, value: str, rate: Rate | None
             ) -> LimitChange:
    """Set (None: unset) a value's live call rate, audited."""
    if rate is not None and (rate.interval_us < 1 or rate.per_ms * 1000 // rate.max < 1):
        raise LiveLimitError("more than one call per microsecond")
    default = next((e.rate.text() for e in policy.entries(profile, value)
                    if e.rate is not None), None)
    prev = store.rate_limit_set(profile, value, rate)
    change = LimitChange(profile, value, "rate", _rate_text(prev), _rate_text(rate), default)
    _audit(policy, change)
    return change


def set_calls(policy: Policy, store: Store, profile: str, value: str, per: str,
              maximum: int | None) -> LimitChange:
    """Set (None: unset) a value's live cap of a calendar window (``per``: one the policy
    gives the profile), audited."""
    default = window_max(policy, profile, per, value)
    prev = store.calls_limit_set(profile, value, per, maximum)
    change = LimitChange(profile, value, "calls",
                         None if prev is None else f"{prev}/{per}",
                         None if maximum is None else f"{maximum}/{per}",
                         f"{default}/{per}")
    _audit(policy, change)
    return change


def window_max(policy: Policy, profile: str, per: str, value: str | None = None) -> int:
    """The policy's cap of a profile's (or one value's) ``per`` window; raises when it
    has no such window (a live cap changes a window the policy gives, it adds none)."""
    windows = {w.per: w.max for e in policy.entries(profile, value) for w in e.calls}
    if per not in windows:
        have = ", ".join(sorted(windows)) or "none"
        raise LiveLimitError(f"profile {profile!r} has no {per!r} window in the policy "
                             f"(its windows: {have}); add it to the policy first")
    return windows[per]


def _rate_text(rate: Rate | None) -> str | None:
    return None if rate is None else f"{rate.text()} burst {rate.burst}"


def _audit(policy: Policy, change: LimitChange) -> None:
    kind = {} if change.kind is None else {"kind": change.kind}
    get_logger("policer.audit").info(
        "live_limit_changed", namespace=policy.namespace, profile=change.profile,
        value=change.value, **kind, old=change.old, new=change.new,
        policy_default=change.default,
        user=os.environ.get("SUDO_USER") or os.environ.get("USER", ""))
