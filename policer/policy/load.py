"""Loading a policy: YAML text to a :class:`~policer.policy.model.Policy`, or every
problem of the file at once as a :class:`~policer.policy.model.PolicyError`.

:func:`parse_policy` composes the YAML node tree, reads each section
(:mod:`policer.policy.sections`), builds the tree, then runs the checks that span
sections over it in one pass (:func:`cross_checks`).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import yaml
from yaml.nodes import Node

from policer.policy.model import WEEK_MIN, Policy, PolicyError
from policer.policy.reader import Reader
from policer.policy.sections import (
    read_call,
    read_classes,
    read_emergency,
    read_header,
    read_keep,
    read_limits,
    read_near_limit,
    read_nodes,
    read_on_store_error,
    read_pending_queue,
    read_profiles,
    read_reject,
    read_schedules,
    read_shadow,
    read_store_timeout,
    read_timeouts,
    read_timezone,
)

__all__ = ["cross_checks", "load_policy", "parse_policy"]

_TOP_KEYS = (
    "version", "namespace", "call", "classes", "profiles", "limits", "emergency",
    "timeouts", "reject", "on_store_error", "store_timeout", "shadow", "near_limit", "nodes",
    "pending_queue", "call_records", "attempts", "timezone", "schedules",
)


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
    r = Reader(source)
    policy = build(r, root)
    if policy is not None:
        cross_checks(r, policy)
    if r.errors or policy is None:
        raise PolicyError(r.sorted_errors())
    return policy


def build(r: Reader, root: Node) -> Policy | None:
    """The tree, section by section (also when some sections have errors, so that the
    checks across sections still run); None when the document is not a mapping."""
    top = r.mapping(root, "(document)", _TOP_KEYS)
    if top is None:
        return None
    version, namespace = read_header(r, root, top)
    number_source, attributes = read_call(r, top.get("call"))
    classes = read_classes(r, top.get("classes"))
    class_names = {c.name for c in classes}
    profiles, profile_names = read_profiles(r, top.get("profiles"), attributes, class_names)
    default_reject = read_reject(r, top.get("reject"))
    timezone = Policy(namespace="").timezone
    if "timezone" in top:
        timezone = read_timezone(r, top["timezone"]) or timezone
    schedules = read_schedules(r, top.get("schedules"))
    limit_entries = read_limits(r, top.get("limits"), profile_names, default_reject,
                                  schedules)
    emergency_class, bypass = read_emergency(r, top.get("emergency"), class_names)
    return Policy(
        namespace=namespace,
        number_source=number_source,
        attributes=MappingProxyType(attributes),
        classes=tuple(classes),
        profiles=tuple(profiles),
        limits=MappingProxyType({name: e[0] for name, e in limit_entries.items()}),
        emergency_class=emergency_class,
        emergency_bypass=bypass,
        timeouts=read_timeouts(r, top.get("timeouts"), class_names),
        reject=default_reject,
        on_store_error=read_on_store_error(r, top.get("on_store_error")),
        store_timeout_ms=read_store_timeout(r, top.get("store_timeout")),
        shadow=read_shadow(r, top.get("shadow")),
        near_limit_ratio=read_near_limit(r, top.get("near_limit")),
        nodes=read_nodes(r, top.get("nodes")),
        pending_queue=read_pending_queue(r, top.get("pending_queue")),
        call_records_keep=read_keep(r, top.get("call_records"), "call_records",
                                    Policy(namespace="").call_records_keep),
        attempts_keep=read_keep(r, top.get("attempts"), "attempts",
                                Policy(namespace="").attempts_keep),
        timezone=timezone,
        schedules=MappingProxyType(schedules),
        limit_entries=MappingProxyType(limit_entries),
        source=r.source,
        version=version or 1,
    )


def cross_checks(r: Reader, policy: Policy) -> None:
    """The checks that span sections, in one pass over the built tree: a reserve needs
    an emergency class; the entries of a scheduled list must each be reachable, and
    scheduled entries must not share hours (the first match wins)."""
    for name, entries in policy.limit_entries.items():
        covered: set[int] = set()
        for i, lim in enumerate(entries):
            path = r.entry_paths.get((name, i), f"limits.{name}")
            listed = path != f"limits.{name}"
            if lim.reserve_for_emergency and policy.emergency_class is None:
                where = f"{path}.reserve_for_emergency"
                r.error(r.nodes.get(where, r.nodes["limits"]), where,
                        "needs an emergency class (emergency.class)")
            if not listed:
                continue
            node = r.nodes[path]
            if lim.schedule is None:
                if i < len(entries) - 1:
                    after = r.entry_paths[(name, i + 1)]
                    r.error(r.nodes[after], after,
                            f"unreachable: entry {path.rpartition('[')[2][:-1]} has no "
                            "schedule and always applies (put entries without a schedule "
                            "last)")
                    break
                if len(covered) == WEEK_MIN:
                    r.error(node, path, "unreachable: the schedules of the entries above "
                            "cover the whole week")
                continue
            mine = policy.schedules[lim.schedule].minutes()
            if mine <= covered:
                r.error(node, path, f"unreachable: schedule {lim.schedule!r} is covered "
                        "by the entries above")
            elif mine & covered:
                r.error(node, path, f"schedule {lim.schedule!r} overlaps an entry above "
                        "(the first match wins): make the schedules disjoint")
            covered |= mine
