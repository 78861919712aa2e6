"""The sections of a policy file, each a function from its YAML node to its part of
the :class:`~policer.policy.model.Policy` tree: it returns the value (defaults from the
model) and reports its problems through the :class:`~policer.policy.reader.Reader`.
Checks that span sections run afterwards, over the built tree
(:func:`policer.policy.load.cross_checks`).
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Collection, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from types import MappingProxyType
from typing import Literal

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policer.policy.bounds import (
    MAX_CLASS_ENTRIES,
    PREFIXES_FILE_MAX_BYTES,
    PREFIXES_FILE_MAX_BYTES_ENV,
    TextError,
    read_text,
)
from policer.policy.durations import UNIT_MS, format_ms
from policer.policy.model import (
    ATTRIBUTE_SOURCES,
    DAYS,
    WINDOWS,
    Direction,
    Limit,
    Nodes,
    NumberClass,
    Policy,
    Profile,
    Rate,
    Reject,
    Schedule,
    Timeouts,
    Window,
)
from policer.policy.reader import NUMBER, Reader, did_you_mean, kind_of, shown

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
#: Keys of one limit (or of one entry of a scheduled list).
_LIMIT_KEYS = ("max", "reserve_for_emergency", "reject", "shadow", "rate", "calls",
               "max_duration", "rate_reject", "schedule")
#: Networks ``directions`` may list in all: a call from an address not seen recently
#: is matched against each in turn.
MAX_DIRECTION_SOURCES = 1_000
#: The language's defaults, as the model has them.
_DEFAULT = Policy(namespace="")


def read_header(r: Reader, root: Node, top: Mapping[str, Node]) -> tuple[int, str]:
    """``version`` and ``namespace`` (both required)."""
    for required in ("version", "namespace"):
        if required not in top:
            r.error(root, required, "required key is missing")
    version = 0
    if "version" in top:
        vnode = top["version"]
        value = r.scalar(vnode) if isinstance(vnode, ScalarNode) else None
        if value not in (1, 2) or isinstance(value, bool):
            shown_version = repr(vnode.value) if isinstance(vnode, ScalarNode) \
                else kind_of(vnode)
            r.error(vnode, "version", f"unsupported policy version {shown_version}; this "
                    "policer reads versions 1 and 2")
        else:
            version = int(value)
    namespace = ""
    if "namespace" in top:
        namespace = r.string(top["namespace"], "namespace", _NAMESPACE,
                             "letters, digits, '_', '.', '-' only (1-64)") or ""
    return version, namespace


def read_emergency(r: Reader, node: Node | None, class_names: set[str]
                   ) -> tuple[str | None, bool]:
    """``emergency``: its class (default: a class named ``emergency``) and bypass."""
    bypass = _DEFAULT.emergency_bypass
    if node is None:
        return ("emergency" if "emergency" in class_names else None), bypass
    emergency_class: str | None = None
    m = r.mapping(node, "emergency", ("class", "bypass")) or {}
    if "class" in m:
        emergency_class = r.string(m["class"], "emergency.class")
        if emergency_class is not None and emergency_class not in class_names:
            r.unknown_ref(m["class"], "emergency.class", "class", emergency_class, class_names)
            emergency_class = None
    if "bypass" in m:
        b = r.boolean(m["bypass"], "emergency.bypass")
        bypass = b if b is not None else bypass
    return emergency_class, bypass


def read_timeouts(r: Reader, node: Node | None, class_names: set[str]) -> Timeouts:
    timeouts = _DEFAULT.timeouts
    if node is None:
        return timeouts
    m = r.mapping(node, "timeouts", ("early", "dialog", "max_duration")) or {}
    early, dialog = timeouts.early_ms, timeouts.dialog_ms
    if "early" in m:
        early = r.duration_ms(m["early"], "timeouts.early", 1000, 86_400_000) or early
    if "dialog" in m:
        dialog = r.duration_ms(m["dialog"], "timeouts.dialog", 1000, 7 * 86_400_000) or dialog
    md_default, md_by_class = timeouts.max_duration_ms, dict(timeouts.max_duration_by_class)
    if "max_duration" in m:
        md_default, md_by_class = read_max_durations(r, m["max_duration"], class_names)
    return Timeouts(early_ms=early, dialog_ms=dialog, max_duration_ms=md_default,
                    max_duration_by_class=MappingProxyType(md_by_class))


def read_on_store_error(r: Reader, node: Node | None) -> Literal["admit", "reject"]:
    if node is None:
        return _DEFAULT.on_store_error
    c = r.choice(node, "on_store_error", ("admit", "reject"))
    if c is None:
        return _DEFAULT.on_store_error
    return "reject" if c == "reject" else "admit"


def read_store_timeout(r: Reader, node: Node | None) -> int:
    if node is None:
        return _DEFAULT.store_timeout_ms
    return r.duration_ms(node, "store_timeout", 1, 10_000) or _DEFAULT.store_timeout_ms


def read_load_timeout(r: Reader, node: Node | None) -> int:
    """``load_timeout``: the bound on one FUNCTION LOAD of the library (control plane)."""
    if node is None:
        return _DEFAULT.load_timeout_ms
    return r.duration_ms(node, "load_timeout", 100, 600_000) or _DEFAULT.load_timeout_ms


def read_shadow(r: Reader, node: Node | None) -> bool:
    return _DEFAULT.shadow if node is None else bool(r.boolean(node, "shadow"))


def read_near_limit(r: Reader, node: Node | None) -> float:
    if node is None:
        return _DEFAULT.near_limit_ratio
    n = r.scalar(node) if isinstance(node, ScalarNode) else None
    if isinstance(n, int | float) and not isinstance(n, bool) and 0 < n <= 1:
        return float(n)
    r.error(node, "near_limit", "expected a ratio above 0 and up to 1")
    return _DEFAULT.near_limit_ratio


def read_nodes(r: Reader, node: Node | None) -> Nodes:
    nodes = _DEFAULT.nodes
    if node is None:
        return nodes
    m = r.mapping(node, "nodes", ("lease", "renew", "on_node_loss")) or {}
    lease, renew = nodes.lease_ms, nodes.renew_ms
    if "lease" in m:
        lease = r.duration_ms(m["lease"], "nodes.lease", 1000, 86_400_000) or lease
    if "renew" in m:
        renew = r.duration_ms(m["renew"], "nodes.renew", 100, 3_600_000) or renew
    loss: Literal["release", "keep"] = nodes.on_node_loss
    if "on_node_loss" in m:
        c = r.choice(m["on_node_loss"], "nodes.on_node_loss", ("release", "keep"))
        loss = "keep" if c == "keep" else "release"
    if renew * 2 > lease:
        r.error(m.get("renew", node), "nodes.renew",
                f"renew ({format_ms(renew)}) must be at most half the lease "
                f"({format_ms(lease)}), or one late renewal loses every call")
    return Nodes(lease_ms=lease, renew_ms=renew, on_node_loss=loss)


def read_pending_queue(r: Reader, node: Node | None) -> int:
    if node is None:
        return _DEFAULT.pending_queue
    pq = r.integer(node, "pending_queue", 0, 10_000_000)
    return pq if pq is not None else _DEFAULT.pending_queue


def read_keep(r: Reader, node: Node | None, key: str, default: int) -> int:
    """``call_records: {keep: N}``, ``attempts: {keep: N}``: entries a capped stream
    keeps (0: none)."""
    if node is None:
        return default
    m = r.mapping(node, key, ("keep",)) or {}
    if "keep" in m:
        k = r.integer(m["keep"], f"{key}.keep", 0, 100_000_000)
        return k if k is not None else default
    return default


def read_reject(r: Reader, node: Node | None) -> Reject:
    """The policy's default ``reject``."""
    if node is None:
        return _DEFAULT.reject
    return r.reject(node, "reject", _DEFAULT.reject) or _DEFAULT.reject


def read_call(r: Reader, node: Node | None) -> tuple[str, dict[str, str]]:
    number = "ruri_user"
    attributes: dict[str, str] = {}
    if node is None:
        return number, attributes
    m = r.mapping(node, "call", ("number", "attributes")) or {}
    if "number" in m:
        number = r.choice(m["number"], "call.number", ("ruri_user", "to_user")) or number
    if "attributes" in m:
        attrs = r.free_mapping(m["attributes"], "call.attributes") or {}
        for name, value_node in attrs.items():
            path = f"call.attributes.{name}"
            if not _NAME.match(name):
                r.error(value_node, path, "attribute names are letters, digits, '_', '-'")
                continue
            if name in ATTRIBUTE_SOURCES:
                r.error(value_node, path, "shadows a built-in attribute of the same name")
                continue
            src = r.source_ref(value_node, path)
            if src is not None:
                attributes[name] = src
    return number, attributes


def read_classes(r: Reader, node: Node | None) -> list[NumberClass]:
    if node is None:
        return []
    m = r.free_mapping(node, "classes") or {}
    out: list[NumberClass] = []
    seen_numbers: dict[str, str] = {}
    seen_prefixes: dict[str, str] = {}
    default_of: str | None = None
    for name, cnode in m.items():
        path = f"classes.{name}"
        if not _NAME.match(name):
            r.error(cnode, path, "class names are letters, digits, '_', '-'")
            continue
        c = r.mapping(cnode, path, ("numbers", "prefixes", "prefixes_file", "default"))
        if c is None:
            continue
        numbers = r.number_list(c["numbers"], f"{path}.numbers") if "numbers" in c else []
        prefixes = (r.number_list(c["prefixes"], f"{path}.prefixes")
                    if "prefixes" in c else [])
        default = ("default" in c
                   and bool(r.boolean(c["default"], f"{path}.default")))
        for kind, items, seen, key in (("number", numbers, seen_numbers, "numbers"),
                                       ("prefix", prefixes, seen_prefixes, "prefixes")):
            if seen.keys().isdisjoint(items):  # the usual case, at C speed
                seen.update(dict.fromkeys(items, name))
                continue
            for i, item in enumerate(items):
                if item in seen:
                    r.error(c[key], f"{path}.{key}[{i}]",
                               f"{kind} {item!r} is already in class {seen[item]!r}")
                seen[item] = name
        if "prefixes_file" in c:
            prefixes += read_prefixes_file(r, c["prefixes_file"], f"{path}.prefixes_file",
                                           name, seen_prefixes)
        if default:
            if default_of is not None:
                r.error(c["default"], f"{path}.default",
                           f"class {default_of!r} is already the default")
            default_of = name
        if not (numbers or prefixes or default or "prefixes_file" in c):
            r.error(cnode, path, "a class needs numbers, prefixes or default: true")
        out.append(NumberClass(name, frozenset(numbers), tuple(prefixes), default))
    entries = len(seen_numbers) + len(seen_prefixes)
    if entries > MAX_CLASS_ENTRIES:
        r.error(node, "classes", f"{entries} numbers and prefixes in all, more than the "
                f"{MAX_CLASS_ENTRIES} a policy library holds (Redis 7.0 gives a library "
                "500 ms to build its tables when it loads it)")
    return out


def read_prefixes_file(r: Reader, node: Node, path: str, class_name: str,
                       seen: dict[str, str]) -> list[str]:
    """``prefixes_file``: the prefixes of a list file beside the policy (its name is
    relative to the policy file's folder), one per line; blank lines and comments
    (a line starting with ``#``, or ``#`` after a blank) are skipped. Its errors are
    reported at the list file's lines; a prefix another class (or this one) has
    already is one of them. Linear in the file's size."""
    name = r.string(node, path)
    if name is None:
        return []
    if not name.strip() or "\x00" in name:
        r.error(node, path, f"not a file name: {name!r}")
        return []
    file = r.base / name
    source = str(file)
    if source not in r.files:
        r.files.append(source)
    try:
        text = read_text(file, PREFIXES_FILE_MAX_BYTES_ENV, PREFIXES_FILE_MAX_BYTES,
                         "a prefixes_file")
    except TextError as e:
        r.error_at(source, e.line, e.column, path, e.message)
        return []
    out: list[str] = []
    number = NUMBER.fullmatch
    get = seen.get
    for lineno, line in enumerate(text.split("\n"), 1):
        item = line.strip()
        if not item or item[0] == "#":
            continue
        if "#" in item:  # a comment after a blank (a '#' inside a prefix is a digit)
            item = _COMMENT.sub("", item)
        if number(item) is None:
            col = len(line) - len(line.lstrip()) + 1
            r.error_at(source, lineno, col, path,
                       f"not a dialled number or prefix: {shown(item)}")
            continue
        owner = get(item)
        if owner is not None:
            col = len(line) - len(line.lstrip()) + 1
            r.error_at(source, lineno, col, path,
                       f"{item!r} is listed twice" if owner == class_name else
                       f"prefix {item!r} is already in class {owner!r}")
            continue
        seen[item] = class_name
        out.append(item)
    return out


#: a comment after the prefix on a list file's line
_COMMENT = re.compile(r"\s+#.*$")


def read_profiles(r: Reader, node: Node | None, attributes: Mapping[str, str],
                  class_names: set[str], direction_names: set[str]
                  ) -> tuple[list[Profile], set[str]]:
    """The profiles, and the names of every profile the file defines (also those with
    errors: a limit on one is not reported again as a limit on an unknown profile)."""
    names_seen: set[str] = set()
    if node is None:
        return [], names_seen
    m = r.free_mapping(node, "profiles") or {}
    out: list[Profile] = []
    for name, pnode in m.items():
        path = f"profiles.{name}"
        if not _NAME.match(name):
            r.error(pnode, path, "profile names are letters, digits, '_', '-'")
            continue
        names_seen.add(name)
        p = r.mapping(pnode, path, ("value", "when", "on_missing_parent"))
        if p is None:
            continue
        value: str | None = None
        parent_of: str | None = None
        if "value" in p and isinstance(p["value"], MappingNode):
            pm = r.mapping(p["value"], f"{path}.value", ("parent",)) or {}
            if "parent" not in pm:
                r.error(p["value"], f"{path}.value", "expected an attribute, or {parent: "
                        "PROFILE} (a level of a hierarchy)")
                continue
            parent_of = r.string(pm["parent"], f"{path}.value.parent")
            if parent_of is None:
                continue
        elif "value" in p:
            vnode = p["value"]
            raw = r.string(vnode, f"{path}.value")
            if raw is None:
                continue
            if raw in attributes:
                value = attributes[raw]
            elif raw in ATTRIBUTE_SOURCES or raw.startswith("header:"):
                value = r.source_ref(vnode, f"{path}.value")
                if value is None:
                    continue
            else:
                known = list(attributes) + list(ATTRIBUTE_SOURCES)
                hint = did_you_mean(raw, known, f"; use one of {', '.join(known)}, or "
                                    "header:<Name> (define others under call.attributes)")
                r.error(vnode, f"{path}.value", f"unknown attribute {raw!r}{hint}")
                continue
        when: frozenset[str] | None = None
        when_dirs: frozenset[str] | None = None
        if "when" in p:
            w = r.mapping(p["when"], f"{path}.when", ("class", "direction")) or {}
            if "class" in w:
                when = names_of(r, w["class"], f"{path}.when.class", "class", class_names)
            if "direction" in w:
                when_dirs = names_of(r, w["direction"], f"{path}.when.direction",
                                   "direction", direction_names)
        missing: Literal["skip", "reject"] = "skip"
        if "on_missing_parent" in p:
            if parent_of is None:
                r.error(p["on_missing_parent"], f"{path}.on_missing_parent",
                        "only a level of a hierarchy (value: {parent: PROFILE}) has parents")
            elif r.choice(p["on_missing_parent"], f"{path}.on_missing_parent",
                          ("skip", "reject")) == "reject":
                missing = "reject"
        out.append(Profile(name=name, value=value, when_classes=when,
                           when_directions=when_dirs, parent_of=parent_of,
                           on_missing_parent=missing))
    _check_hierarchy(r, out, names_seen)
    return out, names_seen


def read_parents(r: Reader, node: Node | None, profiles: list[Profile], used: int = 0
                 ) -> dict[str, dict[str, str]]:
    """``parents.PROFILE: {VALUE: PARENT}``: the file's parents of a hierarchy level (a
    live one, ``policer parent set``, wins). ``used``: the classes' numbers and prefixes,
    which the library's tables hold too (one bound for both)."""
    out: dict[str, dict[str, str]] = {}
    if node is None:
        return out
    levels = {p.name for p in profiles if p.parent_of is not None}
    m = r.free_mapping(node, "parents") or {}
    total = 0
    for name, pnode in m.items():
        path = f"parents.{name}"
        if name not in levels:
            r.error(pnode, path, f"not a level of a hierarchy: give profiles.{name} "
                    "value: {parent: PROFILE}" if any(p.name == name for p in profiles)
                    else f"unknown profile {name!r}{did_you_mean(name, sorted(levels))}")
            continue
        own: dict[str, str] = {}
        for value, vnode in (r.free_mapping(pnode, path) or {}).items():
            parent = r.string(vnode, f"{path}.{value}")
            if parent is None:
                continue
            if not parent or len(parent) > 4096:
                r.error(vnode, f"{path}.{value}", "a parent is 1 to 4096 characters")
                continue
            own[value] = parent
        total += len(own)
        out[name] = own
    if total + used > MAX_CLASS_ENTRIES:
        r.error(node, "parents", f"{total} parents and {used} numbers and prefixes in "
                f"all, more than the {MAX_CLASS_ENTRIES} a policy library holds (register "
                "parents with policer parent set instead)")
    return out


def _check_hierarchy(r: Reader, profiles: list[Profile], names_seen: set[str]) -> None:
    """Each level's ``parent`` is a valued profile, and no level is its own ancestor."""
    by_name = {p.name: p for p in profiles}
    for p in profiles:
        if p.parent_of is None:
            continue
        where = f"profiles.{p.name}.value.parent"
        node = r.nodes[where]
        child = by_name.get(p.parent_of)
        if child is None:
            if p.parent_of not in names_seen:
                r.unknown_ref(node, where, "profile", p.parent_of, names_seen)
            continue
        if not child.valued:
            r.error(node, where, f"profile {child.name!r} has no value: a parent is "
                    "registered per value of a valued profile")
            continue
        seen = {p.name}
        while child is not None and child.parent_of is not None:
            if child.name in seen:
                r.error(node, where, f"a hierarchy without a root: {p.name!r} is its own "
                        "ancestor")
                break
            seen.add(child.name)
            child = by_name.get(child.parent_of)


def names_of(r: Reader, node: Node, path: str, what: str, known: set[str]) -> frozenset[str]:
    """One name or a list of names, each one of ``known`` (``when.class``,
    ``when.direction``, a fraud rule's ``when.class``)."""
    names: list[str] = []
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            s = r.string(item, f"{path}[{i}]")
            if s is not None:
                names.append(s)
    else:
        s = r.string(node, path)
        if s is not None:
            names.append(s)
    for n in names:
        if n not in known:
            r.unknown_ref(node, path, what, n, known)
    return frozenset(names)


def schedule_ref(r: Reader, node: Node, path: str, known: Collection[str]) -> str | None:
    """The name of one of the policy's schedules (None: not one, reported)."""
    name = r.string(node, path)
    if name is not None and name not in known:
        r.unknown_ref(node, path, "schedule", name, known)
        return None
    return name


def read_directions(r: Reader, node: Node | None) -> list[Direction]:
    """``directions``: per name, ``{sources: [CIDR, ...]}`` or ``{default: true}``. A
    call's source IP picks the first direction listed with a network that holds it; a
    network that an earlier one covers is never matched, and is an error."""
    if node is None:
        return []
    m = r.free_mapping(node, "directions") or {}
    out: list[Direction] = []
    seen: list[tuple[IPv4Network | IPv6Network, str]] = []
    default_of: str | None = None
    for name, dnode in m.items():
        path = f"directions.{name}"
        if not _NAME.match(name):
            r.error(dnode, path, "direction names are letters, digits, '_', '-'")
            continue
        d = r.mapping(dnode, path, ("sources", "default"))
        if d is None:
            continue
        default = "default" in d and bool(r.boolean(d["default"], f"{path}.default"))
        networks: list[IPv4Network | IPv6Network] = []
        if "sources" in d:
            snode = d["sources"]
            items = snode.value if isinstance(snode, SequenceNode) else [snode]
            for i, item in enumerate(items):
                ipath = f"{path}.sources[{i}]" if isinstance(snode, SequenceNode) \
                    else f"{path}.sources"
                net = _network(r, item, ipath)
                if net is None:
                    continue
                for earlier, where in seen:
                    if _inside(net, earlier):
                        r.error(item, ipath, f"unreachable: {net} is inside {earlier} of "
                                f"{where} (the first listed match wins)")
                        break
                else:
                    seen.append((net, path))
                    networks.append(net)
            total = len(seen)
            if total > MAX_DIRECTION_SOURCES:
                r.error(snode, f"{path}.sources", f"{total} networks in all, more than "
                        f"the {MAX_DIRECTION_SOURCES} directions may list")
        if default:
            if default_of is not None:
                r.error(d["default"], f"{path}.default",
                        f"direction {default_of!r} is already the default")
            else:
                default_of = name
        if default and "sources" in d:
            r.error(d["default"], f"{path}.default",
                    "a direction has sources or is the default, not both")
        elif not default and "sources" not in d:
            r.error(dnode, path, "a direction needs sources (CIDR networks) or default: true")
        out.append(Direction(name, tuple(networks), default))
    return out


def _inside(net: IPv4Network | IPv6Network, other: IPv4Network | IPv6Network) -> bool:
    if isinstance(net, IPv4Network) and isinstance(other, IPv4Network):
        return net.subnet_of(other)
    if isinstance(net, IPv6Network) and isinstance(other, IPv6Network):
        return net.subnet_of(other)
    return False


def _network(r: Reader, node: Node, path: str) -> IPv4Network | IPv6Network | None:
    """One CIDR network (an address alone is its /32 or /128)."""
    text = r.string(node, path)
    if text is None:
        return None
    try:
        return ip_network(text.strip())
    except ValueError as e:
        try:
            loose = ip_network(text.strip(), strict=False)
        except ValueError:
            r.error(node, path, f"not a CIDR network: {shown(text)} ({e})")
            return None
        r.error(node, path, f"{text.strip()} has host bits set; did you mean {loose}?")
        return None


def read_timezone(r: Reader, node: Node) -> str | None:
    name = r.string(node, "timezone")
    if name is None:
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        known = sorted(zoneinfo.available_timezones())
        hint = did_you_mean(name, known, " (an IANA name such as Europe/Berlin)")
        r.error(node, "timezone", f"unknown time zone {name!r}{hint}")
        return None
    return name


def read_schedules(r: Reader, node: Node | None) -> dict[str, Schedule]:
    if node is None:
        return {}
    m = r.free_mapping(node, "schedules") or {}
    out: dict[str, Schedule] = {}
    for name, snode in m.items():
        path = f"schedules.{name}"
        if not _NAME.match(name):
            r.error(snode, path, "schedule names are letters, digits, '_', '-'")
            continue
        sm = r.mapping(snode, path, ("days", "hours"))
        if sm is None:
            continue
        days: set[int] = set(range(7))
        ok = True
        if "days" in sm:
            dnode = sm["days"]
            items = dnode.value if isinstance(dnode, SequenceNode) else [dnode]
            days = set()
            for i, item in enumerate(items):
                sub = f"{path}.days[{i}]" if isinstance(dnode, SequenceNode) \
                    else f"{path}.days"
                d = r.choice(item, sub, DAYS)
                if d is None:
                    ok = False
                elif DAYS.index(d) in days:
                    r.error(item, sub, f"{d!r} is listed twice")
                else:
                    days.add(DAYS.index(d))
            if not days and ok:
                r.error(dnode, f"{path}.days", "a schedule needs at least one day")
                ok = False
        start, end = 0, 1440
        if "hours" in sm:
            hours = read_hours(r, sm["hours"], f"{path}.hours")
            if hours is None:
                ok = False
            else:
                start, end = hours
        if ok:
            out[name] = Schedule(name, frozenset(days), start, end % 1440)
    return out


def read_hours(r: Reader, node: Node, path: str) -> tuple[int, int] | None:
    text = r.string(node, path)
    if text is None:
        return None
    match = _HOURS.match(text)
    if match is None:
        r.error(node, path, f"expected hours as HH:MM-HH:MM (e.g. 08:00-18:00 or "
                   f"22:00-06:00 across midnight), got {text!r}")
        return None
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        r.error(node, path, f"not a time of day in {text!r} (00:00 to 24:00)")
        return None
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % 1440 and not (start == 0 and end == 1440):
        r.error(node, path, f"{text!r} is empty: start and end are the same time "
                   "(use 00:00-24:00 for the whole day)")
        return None
    return start, end


def read_max_durations(r: Reader, node: Node, class_names: set[str]
                  ) -> tuple[int | None, dict[str, int]]:
    """``timeouts.max_duration``: a duration, or ``{default: D, CLASS: D, ...}``."""
    path = "timeouts.max_duration"
    if not isinstance(node, MappingNode):
        return r.duration_ms(node, path, 1000, 7 * 86_400_000), {}
    m = r.free_mapping(node, path) or {}
    default: int | None = None
    by_class: dict[str, int] = {}
    for name, dnode in m.items():
        if name != "default" and name not in class_names:
            r.unknown_ref(dnode, f"{path}.{name}", "class", name,
                             class_names | {"default"})
            continue
        ms = r.duration_ms(dnode, f"{path}.{name}", 1000, 7 * 86_400_000)
        if ms is None:
            continue
        if name == "default":
            default = ms
        else:
            by_class[name] = ms
    return default, by_class


def read_rate(r: Reader, node: Node, path: str) -> Rate | None:
    m = r.mapping(node, path, ("max", "per", "burst"))
    if m is None:
        return None
    for required in ("max", "per"):
        if required not in m:
            r.error(node, f"{path}.{required}", "required key is missing")
    if "max" not in m or "per" not in m:
        return None
    mx = r.integer(m["max"], f"{path}.max", 1, 1_000_000)
    per = read_rate_period(r, m["per"], f"{path}.per")
    burst = mx
    if "burst" in m:
        burst = r.integer(m["burst"], f"{path}.burst", 1, 1_000_000)
    if mx is None or per is None or burst is None:
        return None
    if per * 1000 // mx < 1:
        r.error(m["max"], f"{path}.max", f"{mx} calls per {format_ms(per)} is more than "
                   "one per microsecond")
        return None
    return Rate(mx, per, burst)


def read_rate_period(r: Reader, node: Node, path: str) -> int | None:
    """A rate's ``per``: a duration (``1s``, ``10s``, ``1m``), or a bare unit (``s``)."""
    value = r.scalar(node) if isinstance(node, ScalarNode) else None
    if isinstance(value, str) and value.strip() in UNIT_MS:
        return UNIT_MS[value.strip()]
    return r.duration_ms(node, path, 1, 86_400_000)


def read_windows(r: Reader, node: Node, path: str) -> tuple[Window, ...] | None:
    items = node.value if isinstance(node, SequenceNode) else [node]
    out: list[Window] = []
    ok = True
    for i, item in enumerate(items):
        sub = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
        m = r.mapping(item, sub, ("max", "per"))
        if m is None:
            ok = False
            continue
        for required in ("max", "per"):
            if required not in m:
                r.error(item, f"{sub}.{required}", "required key is missing")
                ok = False
        if "max" not in m or "per" not in m:
            continue
        mx = r.integer(m["max"], f"{sub}.max", 0, 1_000_000_000)
        per = r.choice(m["per"], f"{sub}.per", tuple(WINDOWS))
        if mx is None or per is None:
            ok = False
            continue
        if any(w.per == per for w in out):
            r.error(m["per"], f"{sub}.per", f"a {per} window is already listed")
            ok = False
            continue
        out.append(Window(mx, per))
    return tuple(sorted(out, key=lambda w: WINDOWS[w.per])) if ok else None


def read_limits(r: Reader, node: Node | None, profile_names: set[str], default_reject: Reject,
                schedules: Mapping[str, Schedule], valued: set[str]) -> tuple[
        dict[str, tuple[Limit, ...]], dict[str, dict[str, tuple[Limit, ...]]]]:
    """Each profile's limit entries, and the entries of single values of valued profiles
    (``values: {VALUE: limit}``, standing instead of the profile's for that value)."""
    out: dict[str, tuple[Limit, ...]] = {}
    by_value: dict[str, dict[str, tuple[Limit, ...]]] = {}
    if node is None:
        return out, by_value
    m = r.free_mapping(node, "limits") or {}
    for name, given in m.items():
        path = f"limits.{name}"
        if name not in profile_names:
            r.unknown_ref(given, path, "profile", name, profile_names)
            continue
        lnode: Node | None = given
        values_node: Node | None = None
        if isinstance(given, MappingNode) and any(
                isinstance(k, ScalarNode) and k.value == "values" for k, _ in given.value):
            values_node = next(v for k, v in given.value
                               if isinstance(k, ScalarNode) and k.value == "values")
            r.nodes[f"{path}.values"] = values_node
            rest = [(k, v) for k, v in given.value
                    if not (isinstance(k, ScalarNode) and k.value == "values")]
            lnode = MappingNode(given.tag, rest, given.start_mark, given.end_mark,
                                given.flow_style) if rest else None
        es: tuple[Limit, ...] = ()
        if lnode is not None:
            es = _entries(r, lnode, path, name, name, default_reject, schedules)
            if es:  # (with an entry missing the file has errors: kept for the checks)
                out[name] = es
        if values_node is not None:
            if name not in valued:
                r.error(values_node, f"{path}.values", "limits of single values need a "
                        f"valued profile (profiles.{name}.value)")
                continue
            # a value's answer is the profile's unless it gives its own
            value_reject = es[0].reject if es else default_reject
            vm = r.free_mapping(values_node, f"{path}.values") or {}
            own: dict[str, tuple[Limit, ...]] = {}
            for value, vnode in vm.items():
                ves = _entries(r, vnode, f"{path}.values.{value}", name,
                               f"{name}.values.{value}", value_reject, schedules)
                if ves:
                    own[value] = ves
            by_value[name] = own
    return out, by_value


def _entries(r: Reader, lnode: Node, path: str, name: str, key: str, default_reject: Reject,
             schedules: Mapping[str, Schedule]) -> tuple[Limit, ...]:
    """One limit or a scheduled list of them (``key``: where the cross-section checks
    find the entries' paths)."""
    if not isinstance(lnode, SequenceNode):
        lim = read_limit(r, lnode, path, name, default_reject, schedules)
        return (lim,) if lim is not None else ()
    entries: list[Limit] = []
    if not lnode.value:
        r.error(lnode, path, "a list of limits needs at least one entry")
    for i, item in enumerate(lnode.value):
        r.nodes[f"{path}[{i}]"] = item
        lim = read_limit(r, item, f"{path}[{i}]", name, default_reject, schedules)
        if lim is not None:
            r.entry_paths[(key, len(entries))] = f"{path}[{i}]"
            entries.append(lim)
    return tuple(entries)


def read_limit(r: Reader, lnode: Node, path: str, name: str, default_reject: Reject,
          schedules: Mapping[str, Schedule]) -> Limit | None:
    lm = r.mapping(lnode, path, _LIMIT_KEYS)
    if lm is None:
        return None
    if not any(k in lm for k in ("max", "rate", "calls", "max_duration")):
        r.error(lnode, f"{path}.max", "required key is missing")
        return None
    mx: int | None = -1
    if "max" in lm:
        mx = r.integer(lm["max"], f"{path}.max", 0, 10_000_000)
    reserve = 0
    if "reserve_for_emergency" in lm:
        res = r.integer(lm["reserve_for_emergency"], f"{path}.reserve_for_emergency", 0,
                        10_000_000)
        if res is not None and mx is not None and res > mx:
            if mx < 0:
                r.error(lm["reserve_for_emergency"], f"{path}.reserve_for_emergency",
                        "needs a max of concurrent calls to reserve slots of")
            else:
                r.error(lm["reserve_for_emergency"], f"{path}.reserve_for_emergency",
                        f"cannot exceed max ({mx})")
        reserve = res or 0
    rej = default_reject
    if "reject" in lm:
        rej = r.reject(lm["reject"], f"{path}.reject", default_reject) or rej
    rate_rej: Reject | None = None
    if "rate_reject" in lm:
        rate_rej = r.reject(lm["rate_reject"], f"{path}.rate_reject", rej)
    shadow = False
    if "shadow" in lm:
        shadow = bool(r.boolean(lm["shadow"], f"{path}.shadow"))
    rate = read_rate(r, lm["rate"], f"{path}.rate") if "rate" in lm else None
    calls: tuple[Window, ...] | None = ()
    if "calls" in lm:
        calls = read_windows(r, lm["calls"], f"{path}.calls")
    duration: int | None = None
    if "max_duration" in lm:
        duration = r.duration_ms(lm["max_duration"], f"{path}.max_duration", 1000,
                                    7 * 86_400_000)
    if "rate_reject" in lm and "rate" not in lm:
        r.error(lm["rate_reject"], f"{path}.rate_reject", "answers rate rejections, "
                   "but this limit has no rate")
    schedule = schedule_ref(r, lm["schedule"], f"{path}.schedule", schedules) \
        if "schedule" in lm else None
    if mx is None or calls is None or ("rate" in lm and rate is None):
        return None
    return Limit(profile=name, max=mx, reserve_for_emergency=reserve, reject=rej,
                 shadow=shadow, rate=rate, calls=calls, max_duration_ms=duration,
                 rate_reject=rate_rej, schedule=schedule)
