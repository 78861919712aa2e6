"""Live parents of a hierarchy's levels (``policer parent set|unset|list``): the value of
a level (``profiles.reseller: {value: {parent: customer}}``) is the parent registered for
the call's value of the level below. Registered in the store, shared by every proxy at
once, audited like live limits; the policy file's ``parents`` are the defaults a live
entry overrides.

What cannot be a parent raises :class:`ParentError` with the reason."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from policer.call import MAX_VALUE
from policer.log import get_logger
from policer.policy import Policy
from policer.store import Store

__all__ = ["ParentChange", "ParentError", "listing", "set_parent"]


class ParentError(ValueError):
    """Not a hierarchy level, or a value or parent that cannot be registered."""


@dataclass(frozen=True, slots=True)
class ParentChange:
    """One live parent set or removed: what it was, what it is, the file's default."""

    profile: str
    value: str
    old: str | None
    new: str | None
    default: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "value": self.value, "old": self.old,
                "new": self.new, "policy_default": self.default}


def level(policy: Policy, profile: str) -> str:
    """The profile a hierarchy level is the parent of; raises unless ``profile`` is a
    level of the policy."""
    p = policy.profile(profile)
    if p is None or p.parent_of is None:
        levels = ", ".join(x.name for x in policy.profiles if x.parent_of) or "none"
        raise ParentError(f"profile {profile!r} is not a level of a hierarchy (value: "
                          f"{{parent: PROFILE}}); the policy's levels: {levels}")
    return p.parent_of


def set_parent(policy: Policy, store: Store, profile: str, value: str,
               parent: str | None) -> ParentChange:
    """Register (None: remove) the live parent of ``value``, audited."""
    level(policy, profile)
    for what, text in (("value", value), ("parent", parent)):
        if text is not None and not 0 < len(text) <= MAX_VALUE:
            raise ParentError(f"a {what} is 1 to {MAX_VALUE} characters")
    if parent is None:
        old = store.parent_unset(profile, value)
    else:
        old = store.parent_set(profile, value, parent)
    change = ParentChange(profile, value, old, parent,
                          policy.parents.get(profile, {}).get(value))
    get_logger("policer.audit").info(
        "parent_changed", namespace=policy.namespace, profile=profile, value=value,
        old=change.old, new=change.new, policy_default=change.default,
        user=os.environ.get("SUDO_USER") or os.environ.get("USER", ""))
    return change


def listing(policy: Policy, store: Store, profile: str) -> dict[str, dict[str, str]]:
    """Every parent of a level that applies: value -> {parent, source (live | policy)}."""
    level(policy, profile)
    out = {v: {"parent": p, "source": "policy"}
           for v, p in policy.parents.get(profile, {}).items()}
    out.update({v: {"parent": p, "source": "live"}
                for v, p in store.parents(profile).items()})
    return out
