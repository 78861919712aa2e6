"""The call mix of ``policer bench``: calls that press on the policy's limits.

A :class:`Template` is one call shape, prepared once: the call's fields, the
attribute argument the admit function receives for it (``ARGV[4]``, exactly what
:meth:`RedisStore.call_arguments` packs), and the limited keys it joins with their
effective max, as the function itself reports them in a dry run
(:meth:`Engine.explain`): the over-admission audit reads those keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

__all__ = ["NODE", "TEMPLATE_CALL_ID", "Template", "templates"]

#: The proxy node every bench call is admitted by.
NODE = "bench"
TEMPLATE_CALL_ID = "CALLID0000"
#: Callers and accounts of the mix.
USERS = 96
ACCOUNTS = 12


@dataclass(frozen=True, slots=True)
class Template:
    """One call shape of the mix: everything but its Call-ID (the From-tag is 'tag')."""

    call: dict[str, Any]  # policer.call.Call fields except call_id / from_tag
    args: tuple[Any, ...]  # ARGV of the admit function for Call-ID TEMPLATE_CALL_ID
    keys: tuple[str, ...]  # every profile key the call joins
    audited: tuple[tuple[str, int], ...]  # (limited key, effective max of an ordinary call)

    def arguments(self, call_id: str) -> list[Any]:
        """ARGV of the admit function for this call shape with another Call-ID."""
        args = list(self.args)
        args[1] = call_id
        return args


def _numbers_by_class(policy: Any) -> dict[str, list[str]]:
    """A few dialled numbers per non-emergency class of the policy."""
    from policer.classify import Classifier

    classifier = Classifier(policy)
    rng = random.Random(7)
    candidates: list[str] = []
    for c in policy.classes:
        for p in c.prefixes:
            candidates += [p + "".join(rng.choice("123456789") for _ in range(9 - len(p) % 3))
                           for _ in range(8)]
    candidates += ["".join(rng.choice("23456789") for _ in range(8)) for _ in range(16)]
    out: dict[str, list[str]] = {}
    for n in candidates:
        cls = classifier.number_class(n)
        if cls is None or cls == policy.emergency_class:
            continue
        if len(out.setdefault(cls, [])) < 8:
            out[cls].append(n)
    return out


def call_fields(policy: Any, count: int = 1024) -> list[dict[str, Any]]:
    """The mix: dialled numbers of every non-emergency class (the default class three
    parts, each other class one: with the example policy 60 % local, 20 % domestic,
    20 % international), callers from a pool of ``USERS``, ``ACCOUNTS`` accounts (one
    call in five without one), 8 source addresses. With about 100 calls held this trips
    the example policy's total, international, per-user and per-account limits, each
    some of the time. Emergency calls are left out: a bypassing emergency call may
    legitimately exceed a max, which the audit would have to excuse."""
    numbers = _numbers_by_class(policy)
    default = next((c.name for c in policy.classes if c.default), None)
    classes = [c for c in sorted(numbers) for _ in range(3 if c == default else 1)]
    if not classes:  # a policy without classes: any number
        numbers, classes = {"": ["5551234"]}, [""]
    rng = random.Random(42)
    out = []
    for i in range(count):
        number = rng.choice(numbers[classes[i % len(classes)]])
        user = f"u{rng.randrange(USERS):02d}"
        headers = {h: f"acct{rng.randrange(ACCOUNTS):02d}"
                   for h in policy.header_names if rng.random() >= 0.2}
        out.append({"from_user": user, "from_domain": "bench.invalid", "ruri_user": number,
                    "to_user": number, "source_ip": f"192.0.2.{rng.randrange(8) + 1}",
                    "auth_user": user, "headers": headers})
    return out


def templates(policy: Any, store: Any, engine: Any, count: int = 1024) -> list[Template]:
    """The mix for one store (namespace) whose library is loaded: ``count`` call shapes
    with their admit arguments and, from a dry run of the function, their limits."""
    from policer.call import Call

    out = []
    for fields in call_fields(policy, count):
        call = Call(TEMPLATE_CALL_ID, "tag", **fields)
        explained = engine.explain(call)
        keys = tuple(store.keys.count_field(v.profile, v.value) for v in explained.limits)
        audited = tuple((k, v.effective_max) for k, v in zip(keys, explained.limits, strict=True)
                        if v.max >= 0 and not v.shadow)
        out.append(Template(fields, tuple(store.call_arguments(call, NODE)), keys, audited))
    return out
