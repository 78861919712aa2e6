"""Loading a policy: YAML text to a :class:`~policer.policy.model.Policy`, or every
problem of the file at once as a :class:`~policer.policy.model.PolicyError`.

:func:`parse_policy` composes the YAML node tree, reads each section
(:mod:`policer.policy.sections`), builds the tree, then runs the checks that span
sections over it in one pass (:func:`cross_checks`).

Every step is linear in the file's size (a class of a million prefixes is a real
list): the YAML is composed by libyaml (PyYAML's C loader) when it is there, with the
garbage collector paused while the tree is built (its passes over a growing heap of
nodes that hold no cycles made a big file quadratic), and the bounds of
:mod:`policer.policy.bounds` are checked before the work they bound.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policer.policy.bounds import (
    MAX_ALIAS_NODES,
    MAX_DEPTH,
    POLICY_MAX_BYTES,
    POLICY_MAX_BYTES_ENV,
    TextError,
    max_bytes,
    read_text,
    too_big,
)
from policer.policy.fraud import read_fraud, read_fraud_events
from policer.policy.model import WEEK_MIN, Policy, PolicyError
from policer.policy.reader import Reader
from policer.policy.sections import (
    read_call,
    read_classes,
    read_directions,
    read_emergency,
    read_header,
    read_keep,
    read_limits,
    read_load_timeout,
    read_near_limit,
    read_nodes,
    read_on_store_error,
    read_parents,
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
    "timeouts", "reject", "on_store_error", "store_timeout", "load_timeout", "shadow",
    "near_limit", "nodes", "pending_queue", "call_records", "attempts", "timezone",
    "schedules", "directions", "parents", "fraud", "fraud_events",
)
_INT = "tag:yaml.org,2002:int"
_STR = "tag:yaml.org,2002:str"


class FastResolve:
    """YAML 1.1's implicit types as PyYAML's resolver gives them (a mixin of a loader),
    with a short way for a plain scalar of ASCII digits (a dialled number, a prefix, a
    count): PyYAML tries its regular expressions one after the other (float, int,
    timestamp), the bulk of composing a list of a million numbers. Digits alone are an
    int (decimal, or octal: ``0`` then 0-7), else (``089``) a string. No path
    resolvers (PyYAML's safe loaders have none): nothing to descend into."""

    def resolve(self, kind: type[Node], value: str, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0] and value.isdigit() and value.isascii():
            if value[0] != "0" or value == "0" or not value[1:].strip("01234567"):
                return _INT
            return _STR
        tag: str = super().resolve(kind, value, implicit)  # type: ignore[misc]
        return tag

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass


#: libyaml's composer, when PyYAML was built with it (its wheels are)
_CLoader: Any = None
if getattr(yaml, "CSafeLoader", None) is not None:
    class _FastCLoader(FastResolve, yaml.CSafeLoader):
        pass

    _CLoader = _FastCLoader
#: A file up to this size that libyaml finds broken is parsed again by the pure-Python
#: loader, whose messages say more ("expected ',' or '}', but got ':'").
_EXPLAIN_BYTES = 1_000_000


class _DepthLoader(FastResolve, yaml.SafeLoader):
    """The pure-Python loader, stopping at :data:`MAX_DEPTH` nested collections (its
    composer recurses: a few thousand ``[`` were a RecursionError)."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        nested = isinstance(event, yaml.CollectionStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"collections nested more than {MAX_DEPTH} deep",
                    event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises :class:`PolicyError`."""
    p = Path(path)
    try:
        text = read_text(p, POLICY_MAX_BYTES_ENV, POLICY_MAX_BYTES, "a policy file")
    except TextError as e:
        raise PolicyError([f"{p}:{e.line}:{e.column}: (file): {e.message}"]) from None
    return parse_policy(text, str(p), base=p.parent)


def parse_policy(text: str, source: str = "<string>", base: Path | None = None) -> Policy:
    """Validate policy text; raises :class:`PolicyError` listing every problem.
    ``base``: the folder ``prefixes_file`` names are relative to (default: the folder
    of ``source``, or the working directory when ``source`` is no path)."""
    try:
        limit = max_bytes(POLICY_MAX_BYTES_ENV, POLICY_MAX_BYTES)
    except ValueError as e:
        raise PolicyError([f"{source}:1:1: (file): {e}"]) from None
    if len(text) > limit:
        raise PolicyError([f"{source}:1:1: (file): "
                           f"{too_big(len(text), limit, POLICY_MAX_BYTES_ENV, 'a policy')}"])
    if base is None:
        base = Path(source).parent if not source.startswith("<") else Path(".")
    with _gc_paused():
        r = Reader(source, base)
        policy = _read(r, text)
        errors = r.sorted_errors() if r.errors or policy is None else []
        files = tuple(r.files)
        del r  # the node tree goes before the collector is back: its pass is short
    if errors or policy is None:
        raise PolicyError(errors, files)
    return policy


def _read(r: Reader, text: str) -> Policy | None:
    root = _compose(text, r.source)
    if root is None:
        raise PolicyError([f"{r.source}:1:1: (document): the policy is empty"])
    _check_shape(root, r.source)
    policy = build(r, root)
    if policy is not None:
        cross_checks(r, policy)
    return policy


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a policy's tree is built: its nodes hold no
    cycles that matter, and the collector's passes over the growing heap cost more than
    the parse itself on a big file (2.1 s instead of 0.75 s for a million prefixes)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _compose(text: str, source: str) -> Node | None:
    """The YAML node tree (libyaml when present), or a syntax PolicyError."""
    try:
        if _CLoader is not None:
            return yaml.compose(text, Loader=_CLoader)
        return yaml.compose(text, Loader=_DepthLoader)
    except yaml.YAMLError as e:
        error = e
    if _CLoader is not None and len(text) <= _EXPLAIN_BYTES:
        try:  # the pure-Python loader explains most mistakes better
            yaml.compose(text, Loader=_DepthLoader)
        except yaml.YAMLError as e:
            error = e
    raise PolicyError([_syntax_error(error, source)]) from None


def _syntax_error(e: yaml.YAMLError, source: str) -> str:
    if not isinstance(e, yaml.MarkedYAMLError):
        return f"{source}:1:1: (syntax): {e}"
    mark = e.problem_mark or e.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    message = e.problem or str(e)
    if message == "exceeded maximum nesting depth":  # libyaml's bound (1000)
        message = f"collections nested more than {MAX_DEPTH} deep"
        return f"{source}:{line}:{col}: (syntax): {message}"
    cm = e.context_mark
    if (e.context and cm is not None and mark is not None
            and (cm.line, cm.column) != (mark.line, mark.column)):
        # where the unfinished construct began: usually where the mistake is
        message += f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
    return f"{source}:{line}:{col}: (syntax): {message}"


def _check_shape(root: Node, source: str) -> None:
    """Depth and aliases, in one pass over the collections (each node once, however
    many aliases name it): at most :data:`MAX_DEPTH` nested collections, no alias
    naming a collection that contains it, and at most :data:`MAX_ALIAS_NODES` nodes
    repeated by aliases in all."""
    seen: set[int] = set()
    repeated = 0
    stack: list[tuple[Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            _shape_error(node, source, f"collections nested more than {MAX_DEPTH} deep")
        key = id(node)
        if key in seen:  # named again by an alias: read again, so counted again
            repeated += _size_of(node, source)
            if repeated > MAX_ALIAS_NODES:
                _shape_error(node, source, f"aliases repeat more than {MAX_ALIAS_NODES} "
                             "nodes: write the repeated parts out")
            continue
        seen.add(key)
        children: list[Node]
        if isinstance(node, SequenceNode):
            children = node.value
            if set(map(type, children)) <= {ScalarNode}:  # a list of numbers: C speed
                continue
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            continue
        for child in children:
            if child.__class__ is not ScalarNode:
                stack.append((child, depth + 1))


def _size_of(node: Node, source: str) -> int:
    """Nodes under ``node`` as an alias repeats them (stops past MAX_ALIAS_NODES; a
    collection inside itself is an error)."""
    count = 0
    stack: list[tuple[Node, tuple[int, ...]]] = [(node, ())]
    while stack and count <= MAX_ALIAS_NODES:
        n, inside = stack.pop()
        count += 1
        if isinstance(n, ScalarNode):
            continue
        if id(n) in inside:
            _shape_error(n, source, "an alias names a collection that contains it")
        children = n.value if isinstance(n, SequenceNode) else \
            [c for pair in n.value for c in pair]
        path = (*inside, id(n)) if len(inside) < MAX_DEPTH else inside
        stack.extend((c, path) for c in children)
    return count


def _shape_error(node: Node, source: str, message: str) -> None:
    mark = node.start_mark
    raise PolicyError([f"{source}:{mark.line + 1}:{mark.column + 1}: (syntax): {message}"])


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
    directions = read_directions(r, top.get("directions"))
    profiles, profile_names = read_profiles(r, top.get("profiles"), attributes, class_names,
                                            {d.name for d in directions})
    default_reject = read_reject(r, top.get("reject"))
    timezone = Policy(namespace="").timezone
    if "timezone" in top:
        timezone = read_timezone(r, top["timezone"]) or timezone
    schedules = read_schedules(r, top.get("schedules"))
    parents = read_parents(r, top.get("parents"), profiles,
                           sum(len(c.numbers) + len(c.prefixes) for c in classes))
    limit_entries, value_entries = read_limits(
        r, top.get("limits"), profile_names, default_reject, schedules,
        {p.name for p in profiles if p.valued})
    emergency_class, bypass = read_emergency(r, top.get("emergency"), class_names)
    return Policy(
        namespace=namespace,
        number_source=number_source,
        attributes=MappingProxyType(attributes),
        classes=tuple(classes),
        directions=tuple(directions),
        profiles=tuple(profiles),
        limits=MappingProxyType({name: e[0] for name, e in limit_entries.items()}),
        emergency_class=emergency_class,
        emergency_bypass=bypass,
        timeouts=read_timeouts(r, top.get("timeouts"), class_names),
        reject=default_reject,
        on_store_error=read_on_store_error(r, top.get("on_store_error")),
        store_timeout_ms=read_store_timeout(r, top.get("store_timeout")),
        load_timeout_ms=read_load_timeout(r, top.get("load_timeout")),
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
        parents=MappingProxyType({name: MappingProxyType(own)
                                  for name, own in parents.items()}),
        value_entries=MappingProxyType({name: MappingProxyType(own)
                                        for name, own in value_entries.items()}),
        fraud=tuple(read_fraud(r, top.get("fraud"), attributes, profiles, class_names,
                               set(schedules))),
        fraud_events_keep=read_fraud_events(r, top.get("fraud_events"),
                                            Policy(namespace="").fraud_events_keep),
        source=r.source,
        files=tuple(r.files),
        version=version or 1,
    )


def cross_checks(r: Reader, policy: Policy) -> None:
    """The checks that span sections, in one pass over the built tree: a reserve needs
    an emergency class; the entries of a scheduled list must each be reachable, and
    scheduled entries must not share hours (the first match wins)."""
    lists = list(policy.limit_entries.items())
    lists += [(f"{name}.values.{value}", entries)
              for name, own in policy.value_entries.items() for value, entries in own.items()]
    for name, entries in lists:
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
