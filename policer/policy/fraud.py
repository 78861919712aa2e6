"""The ``fraud`` section of a policy file: a list of rules, each read into a
:class:`~policer.policy.model.FraudRule` (problems reported through the
:class:`~policer.policy.reader.Reader`, with FILE:LINE:COL like every other section).

A rule counts, per value of its ``key`` (a profile, or a call attribute) and per
calendar window ``per``, the calls it sees (admitted or rejected: sweeping numbers is
the fraud), the distinct numbers they dialled, the longest run of calls in a row to
the same number (``sequential``), the key's live calls (``concurrent``, a profile key
only) and the answered calls shorter than ``short_calls.under`` (counted when they
end). Each statistic has a ``warning`` and a ``critical`` level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from yaml.nodes import Node, SequenceNode

from policer.policy.model import (
    ATTRIBUTE_SOURCES,
    FRAUD_STATS,
    WINDOWS,
    FraudRule,
    Profile,
    Reject,
    Threshold,
)
from policer.policy.reader import NUMBER, Reader, did_you_mean, kind_of
from policer.policy.sections import names_of, schedule_ref

__all__ = ["MAX_FRAUD_PREFIXES", "MAX_FRAUD_RULES", "read_fraud", "read_fraud_events"]

#: Rules a policy may hold: each is evaluated in every call it applies to.
MAX_FRAUD_RULES = 32
#: Prefixes of one rule's ``when.prefixes``: each call's number is compared with each.
MAX_FRAUD_PREFIXES = 100
_RULE_KEYS = ("name", "key", "when", "per", *FRAUD_STATS, "action", "shadow")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_LEVEL_MAX = 1_000_000_000
#: The answer of a call a rule rejects when its action does not say.
DEFAULT_REJECT = Reject(403, "Fraud Suspected", None)


def read_fraud(r: Reader, node: Node | None, attributes: Mapping[str, str],
               profiles: list[Profile], class_names: set[str], schedule_names: set[str]
               ) -> list[FraudRule]:
    """``fraud``: a list of rules (names unique)."""
    if node is None:
        return []
    if not isinstance(node, SequenceNode):
        r.error(node, "fraud", f"expected a list of rules, got {kind_of(node)}")
        return []
    if len(node.value) > MAX_FRAUD_RULES:
        r.error(node, "fraud", f"{len(node.value)} rules, more than the {MAX_FRAUD_RULES} "
                "a policy may hold (each is evaluated in every call it applies to)")
        return []
    out: list[FraudRule] = []
    seen: set[str] = set()
    for i, item in enumerate(node.value):
        rule = _read_rule(r, item, f"fraud[{i}]", attributes, profiles, class_names,
                          schedule_names)
        if rule is None:
            continue
        if rule.name in seen:
            r.error(item, f"fraud[{i}].name", f"a rule named {rule.name!r} is already listed")
            continue
        seen.add(rule.name)
        out.append(rule)
    return out


def read_fraud_events(r: Reader, node: Node | None, default: int) -> int:
    """``fraud_events: {keep: N}``: the events the capped stream keeps."""
    if node is None:
        return default
    m = r.mapping(node, "fraud_events", ("keep",)) or {}
    if "keep" in m:
        k = r.integer(m["keep"], "fraud_events.keep", 1, 10_000_000)
        return k if k is not None else default
    return default


def _read_rule(r: Reader, node: Node, path: str, attributes: Mapping[str, str],
               profiles: list[Profile], class_names: set[str], schedule_names: set[str]
               ) -> FraudRule | None:
    m = r.mapping(node, path, _RULE_KEYS)
    if m is None:
        return None
    ok = True
    for required in ("name", "key", "per"):
        if required not in m:
            r.error(node, f"{path}.{required}", "required key is missing")
            ok = False
    if not ok:
        return None
    name = r.string(m["name"], f"{path}.name", _NAME,
                    "rule names are letters, digits, '_', '-' (up to 64)")
    per = r.choice(m["per"], f"{path}.per", tuple(WINDOWS))
    key = r.string(m["key"], f"{path}.key")
    source, profile = _key_source(r, m["key"], f"{path}.key", key, attributes, profiles)
    stats: dict[str, Threshold] = {}
    short_under = 0
    for stat in FRAUD_STATS:
        if stat not in m:
            continue
        spath = f"{path}.{stat}"
        keys = ("under", "warning", "critical") if stat == "short_calls" \
            else ("warning", "critical")
        sm = r.mapping(m[stat], spath, keys)
        if sm is None:
            ok = False
            continue
        levels: dict[str, int] = {}
        for level in ("warning", "critical"):
            if level in sm:
                v = r.integer(sm[level], f"{spath}.{level}", 1, _LEVEL_MAX)
                if v is None:
                    ok = False
                else:
                    levels[level] = v
        if "warning" not in sm and "critical" not in sm:
            r.error(m[stat], spath, "needs a warning or a critical level (or both)")
            ok = False
            continue
        if "warning" in levels and "critical" in levels \
                and levels["warning"] >= levels["critical"]:
            r.error(sm["warning"], f"{spath}.warning", f"must be below critical "
                    f"({levels['critical']}): the warning comes first")
            ok = False
        if stat == "short_calls":
            if "under" not in sm:
                r.error(m[stat], f"{spath}.under", "required key is missing (answered "
                        "calls shorter than this count, e.g. under: 6s)")
                ok = False
            else:
                u = r.duration_ms(sm["under"], f"{spath}.under", 1000, 3_600_000)
                if u is None:
                    ok = False
                else:
                    short_under = u
        if stat == "concurrent" and profile is None and key is not None and source:
            r.error(m[stat], spath, f"counts the live calls of a profile: key {key!r} is "
                    "an attribute; make the key a profile whose value is it")
            ok = False
        stats[stat] = Threshold(levels.get("warning"), levels.get("critical"))
    if not stats and ok:
        r.error(node, path, f"a rule needs at least one statistic ({', '.join(FRAUD_STATS)})")
        ok = False
    classes: frozenset[str] | None = None
    prefixes: tuple[str, ...] = ()
    schedule: str | None = None
    if "when" in m:
        wpath = f"{path}.when"
        w = r.mapping(m["when"], wpath, ("class", "prefixes", "schedule")) or {}
        if "class" in w:
            classes = names_of(r, w["class"], f"{wpath}.class", "class", class_names)
        if "prefixes" in w:
            prefixes = _prefixes(r, w["prefixes"], f"{wpath}.prefixes")
        if "schedule" in w:
            schedule = schedule_ref(r, w["schedule"], f"{wpath}.schedule", schedule_names)
    block_ms = WINDOWS[per] if per is not None else 3_600_000
    reject = DEFAULT_REJECT
    if "action" in m:
        apath = f"{path}.action"
        a = r.mapping(m["action"], apath, ("block", "reject")) or {}
        if "block" in a:
            b = r.duration_ms(a["block"], f"{apath}.block", 1000, 366 * 86_400_000)
            block_ms = b if b is not None else block_ms
        if "reject" in a:
            reject = r.reject(a["reject"], f"{apath}.reject", DEFAULT_REJECT) or reject
    shadow = False
    if "shadow" in m:
        shadow = bool(r.boolean(m["shadow"], f"{path}.shadow"))
    if name is None or per is None or key is None or source is None or not ok:
        return None
    return FraudRule(
        name=name, key=key, source=source, profile=profile, when_classes=classes,
        when_prefixes=prefixes, when_schedule=schedule, per=per,
        stats=MappingProxyType(stats), short_under_ms=short_under, block_ms=block_ms,
        reject=reject, shadow=shadow)


def _key_source(r: Reader, node: Node, path: str, key: str | None,
                attributes: Mapping[str, str], profiles: list[Profile]
                ) -> tuple[str | None, str | None]:
    """The attribute a rule's key reads, and the profile it names (None: an attribute)."""
    if key is None:
        return None, None
    for p in profiles:
        if p.name == key:
            if p.value is None:
                r.error(node, path, f"profile {key!r} has no value (a key counts per value)"
                        if p.parent_of is None else
                        f"profile {key!r} is a level of a hierarchy: use the attribute of "
                        "the level below, or that level's profile")
                return None, None
            return p.value, p.name
    if key in attributes:
        return attributes[key], None
    if key in ATTRIBUTE_SOURCES or key.startswith("header:"):
        return r.source_ref(node, path), None
    known = [p.name for p in profiles if p.value is not None] + list(attributes) \
        + list(ATTRIBUTE_SOURCES)
    r.error(node, path, f"unknown key {key!r}{did_you_mean(key, known)}; a key is a "
            "valued profile or a call attribute (from_user, header:<Name>, or a name "
            "under call.attributes)")
    return None, None


def _prefixes(r: Reader, node: Node, path: str) -> tuple[str, ...]:
    items = r.number_list(node, path)
    if len(items) > MAX_FRAUD_PREFIXES:
        r.error(node, path, f"{len(items)} prefixes, more than the {MAX_FRAUD_PREFIXES} a "
                "rule may list (use a class for more)")
        return ()
    for i, p in enumerate(items):
        if NUMBER.fullmatch(p) is None:
            r.error(node, f"{path}[{i}]", f"not a dialled prefix: {p!r}")
    return tuple(items)
