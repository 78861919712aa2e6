"""Compiling a validated policy into its Redis Function library.

The library (the Lua files of ``policer/store/lua/lib/``) holds the whole admission rule:
classification, encoding of SIP values into keys, every limit, all-or-none. What
differs from one policy to the next is a block of Lua constants that this module
writes in front of it (classification tables, profiles and their limits, reject
answers, timeouts). Redis builds those tables once, when it loads the library
(``FUNCTION LOAD REPLACE``), so a call pays for none of it.

While Redis 7.0 loads a library only the ``redis`` global exists: the constants are
plain table constructors, nothing else. A classification table of more than
:data:`TABLE_CHUNK` entries (a class of a million prefixes) is written as a series of
small functions that each fill :data:`TABLE_CHUNK` entries of it: Lua 5.1 allows a
function 2^18 constants, so one constructor of them all fails to compile ("constant
table overflow").

Compiling is linear in the policy's size, and a policy is compiled once: the last
few libraries are remembered by policy (a frozen tree) and namespace.

:func:`compile_policy` returns a :class:`Library`: its name, its text, its hash (the
policy hash ``policer stats`` shows) and the names of its functions.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from ipaddress import IPv4Network, IPv6Network

from policer import protocol
from policer.calendar import transitions
from policer.call import MAX_VALUE
from policer.policy import Limit, Policy, Reject
from policer.policy.model import FRAUD_STATS, FraudRule, shared_counts

__all__ = [
    "ATTEMPTS_KEEP_DEFAULT",
    "CDR_KEEP_DEFAULT",
    "DECIDED_MS",
    "ENDED_CODE",
    "ENDED_REASON",
    "GRACE_MS",
    "LIBRARY_FORMAT",
    "NODE_MARGIN_MS",
    "RECOVERY_MS",
    "TABLE_CHUNK",
    "TICK_BATCH",
    "Library",
    "attribute_sources",
    "attributes_sig",
    "compile_policy",
    "function_suffix",
]

#: Longest encoded SIP value used verbatim inside a key; longer ones end in a digest
#: (policer.store.keys.key_part and the library's key_part).
MAX_KEY_PART = 200
#: The calling convention's version (``policer_read_S info``); bump on a change.
LIBRARY_FORMAT = 6
#: A decided (rejected or ended) dialog is remembered this long: late retransmissions of
#: its INVITE get the same answer (an INVITE transaction lives 64*T1 = 32 s).
DECIDED_MS = 32_000
#: A dialog's record outlives its deadline by this much (the tick ends it meanwhile).
GRACE_MS = 60_000
#: Dialogs one tick call ends at most per kind (lost nodes, own earlier, expired): each
#: call stays near a millisecond of Redis time, so decisions never wait long behind it.
TICK_BATCH = 40
#: After Redis lost its state, admits are held this long (the callers' fallback decides)
#: while every node puts its live calls back (each node's tick notices within a second).
RECOVERY_MS = 3_000
#: A node's lease is another instance's while that instance renewed it within one renew
#: interval and this margin (a tick's period, and the time a renewal takes).
NODE_MARGIN_MS = 1_500
#: The answer to an admit of a dialog that already ended (a late retransmission of a
#: cancelled call's INVITE, a re-sent Call-ID): rejected, never admitted uncounted.
ENDED_CODE = 487
ENDED_REASON = "Request Terminated"
#: A live dialog's record key outlives its deadline by this much (real time): the
#: sweeps end it first; only a namespace no node ticks for a day loses it so.
KEEP_MS = 86_400_000
#: Call-end records kept when the policy does not say.
CDR_KEEP_DEFAULT = 100_000
#: Attempts (one per dialog, every decision) kept when the policy does not say.
ATTEMPTS_KEEP_DEFAULT = 100_000
#: Entries of a classification table one Lua function fills (a bigger table is filled
#: by several): well under Lua 5.1's 2^18 constants per function.
TABLE_CHUNK = 50_000
#: Libraries remembered by :func:`compile_policy` (per live policy and namespace).
_CACHED = 4
#: Attributes every admit carries besides those the policy reads (for call records).
_RECORD_SOURCES = ("from_user", "from_domain", "source_ip")


@dataclass(frozen=True, slots=True)
class Library:
    """A policy compiled for Redis Functions."""

    namespace: str
    name: str  # the library name (FUNCTION LOAD)
    text: str  # what FUNCTION LOAD REPLACE receives
    policy_hash: str  # sha1 of the text, as policer_read_S 'info' reports it
    attributes: tuple[str, ...]  # what ARGV[4] of policer_admit_S carries, in order
    extra: tuple[str, ...] = ()  # Lua appended (tests' entry points)

    @property
    def attributes_sig(self) -> str:
        """A short name of the attribute list (``ATTRS_SIG``): what a caller that packs
        attributes by its own copy of the list sends, to be refused on a mismatch."""
        return attributes_sig(self.attributes)

    @property
    def suffix(self) -> str:
        return function_suffix(self.namespace)

    def function(self, op: str) -> str:
        """The name of one of the library's functions (admit, admitm, batch, tick, read)."""
        return f"policer_{op}_{self.suffix}"

    @property
    def prefix(self) -> str:
        """The namespace key every call declares (KEYS[1])."""
        return f"policer:{{{self.namespace}}}:"


def function_suffix(namespace: str) -> str:
    """The namespace as a Redis function-name part (letters, digits, ``_`` only):
    ``_`` becomes ``__``, ``.`` ``_d`` and ``-`` ``_h``, so two namespaces never share it."""
    out = []
    for ch in namespace:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch == "_":
            out.append("__")
        elif ch == ".":
            out.append("_d")
        elif ch == "-":
            out.append("_h")
        else:
            out.append(f"_x{ord(ch):02x}")
    return "".join(out)


def attribute_sources(policy: Policy | None) -> tuple[str, ...]:
    """The call attributes the compiled function reads, in the order callers send them:
    the dialled number's source first, then From user and domain and the source IP
    (for call records), then what the profiles read."""
    sources: list[str] = [policy.number_source if policy is not None else "ruri_user"]
    sources += _RECORD_SOURCES
    if policy is not None:
        sources += [p.value for p in policy.profiles if p.value is not None]
        sources += [rule.source for rule in policy.fraud]
    return tuple(dict.fromkeys(sources))


def attributes_sig(attributes: Sequence[str]) -> str:
    """The first 12 hex digits of the SHA-1 of the attribute sources, in order."""
    return hashlib.sha1("\n".join(attributes).encode()).hexdigest()[:12]


#: a string that is its own Lua literal between double quotes
_PLAIN = re.compile(r'[ !#-\[\]-~]*')


def _lua_str(s: str) -> str:
    """A Lua string literal (every byte outside printable ASCII escaped as \\ddd)."""
    if _PLAIN.fullmatch(s) is not None:  # the usual case: numbers, names
        return f'"{s}"'
    out = ['"']
    for b in s.encode("utf-8", "surrogateescape"):
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


def _lua(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _lua_str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    raise TypeError(f"no Lua constant for {type(value).__name__}")


def _reject(r: Reject) -> list[object]:
    return [r.code, r.reason, -1 if r.retry_after is None else r.retry_after]


def _fraud_rules(rules: Sequence[FraudRule], index: Mapping[str, int],
                 sched_index: Mapping[str, int]) -> list[dict[str, object]]:
    """The fraud rules as fraud.lua reads them, in order: each rule's key's attribute
    (and profile), when (classes, prefixes, schedule index), window, per statistic
    {warning, critical} (-1 none), short calls' bound, block (ms), answer, shadow; the
    rule whose state field keeps its counts (``model.shared_counts``) and whether that
    state counts distinct numbers and runs (some rule sharing it watches them)."""
    owners = shared_counts(rules)
    out = []
    for rule in rules:
        group = [r for r in rules if owners[r.name] is owners[rule.name]]
        out.append(_fraud_rule(rule, owners[rule.name].name, group, index, sched_index))
    return out


def _fraud_rule(rule: FraudRule, state: str, group: Sequence[FraudRule],
                index: Mapping[str, int], sched_index: Mapping[str, int]
                ) -> dict[str, object]:
    return {
        "state": state,
        "gd": any("distinct_numbers" in r.stats for r in group),
        "gq": any("sequential" in r.stats for r in group),
        "name": rule.name, "key": rule.key, "attr": index[rule.source], "prof": rule.profile,
        "when": ({c: True for c in sorted(rule.when_classes)}
                 if rule.when_classes is not None else None),
        "pre": list(rule.when_prefixes) or None,
        "sched": sched_index[rule.when_schedule] if rule.when_schedule else None,
        "per": rule.per,
        "st": [[-1 if t.warning is None else t.warning, -1 if t.critical is None
                else t.critical] if (t := rule.stats.get(stat)) is not None else False
               for stat in FRAUD_STATS],
        "under": rule.short_under_ms, "block": rule.block_ms, "rej": _reject(rule.reject),
        "shadow": rule.shadow,
    }


def _entry(lim: Limit, idx: int, policy_shadow: bool, sched_index: dict[str, int]) -> str:
    """One entry of a profile's limit as a Lua table: concurrent max, reserve, shadow,
    schedule (index into SCHED), rate (T and tau in microseconds), calendar windows
    ({per, max}), max duration (ms, -1 none), reject answers (rrej: rate rejections)."""
    fields: dict[str, object] = {
        "idx": idx,
        "max": lim.max,
        "reserve": lim.reserve_for_emergency,
        "shadow": policy_shadow or lim.shadow,
        "sched": sched_index[lim.schedule] if lim.schedule is not None else None,
        "dur": lim.max_duration_ms if lim.max_duration_ms is not None else -1,
        "rej": _reject(lim.reject),
        "rrej": _reject(lim.rate_answer),
    }
    if lim.rate is not None:
        fields.update(T=lim.rate.interval_us, tau=lim.rate.tolerance_us, burst=lim.rate.burst)
    if len(lim.calls) <= 2:
        # check_fast reads and writes this entry's state (at most two windows)
        fields["fast"] = True
    if lim.calls:
        # {per, max, the pattern of its part of the state field, its live cap's pattern}
        fields["win"] = [[w.per, w.max, f"|{w.per}=(%d+):(%d+)", f",{w.per}=(%d+)"]
                         for w in lim.calls]
    return "{" + ", ".join(f"{k} = {_lua(v)}" for k, v in fields.items() if v is not None) + "}"


#: The library's Lua files (policer/store/lua/lib/), concatenated in this order after
#: the constants and the code generated from policer.protocol: each uses only what the
#: files before it define.
LUA_FILES = ("header", "encoding", "calendar", "classify", "limits", "fraud", "dialogs",
             "decide",
             "admit", "egress", "batch", "tick", "read", "register")


@cache
def _lua_file(name: str) -> str:
    return (resources.files("policer.store") / "lua" / "lib" / f"{name}.lua").read_text()


def _library_code() -> str:
    parts = [_lua_file("header"), _protocol_code()]
    parts += [_lua_file(name) for name in LUA_FILES[1:]]
    return "\n".join(parts)


@cache
def _protocol_code() -> str:
    """Lua written from the tables of :mod:`policer.protocol`: the reply builders, the
    dialog record's and the decision's pack and unpack, their positions."""
    reply = protocol.ADMIT_REPLY.fields
    native = protocol.NATIVE_REPLY.fields
    rec = protocol.DIALOG.fields
    dec = protocol.DECISION.fields
    out = ["-- ------------------------------------------------------------------ protocol",
           "-- generated by policer.compile from the tables of policer.protocol: do not "
           "write these by hand", ""]
    args = ", ".join(reply)
    out += [f"-- the admit reply ({protocol.ADMIT_REPLY.name}), in its order",
            f"local function admit_reply({args})",
            f"  return {{{args}}}", "end", ""]
    nargs = ", ".join("max_duration" if f == "max_duration_s" else f for f in native)
    out += ["-- mode A: the reply a proxy's cfg reads (the max duration in seconds)",
            f"local function native_reply({nargs})",
            "  local max_duration_s = -1",
            "  if max_duration > 0 then max_duration_s = math.ceil(max_duration / 1000) end",
            f"  return {{{', '.join(native)}}}", "end", "",
            f"local R_DUPLICATE = {protocol.ADMIT_REPLY.lua('duplicate')}", ""]
    row = ", ".join(protocol.EXPLAIN_ROW.fields)
    eg = ", ".join(protocol.EGRESS_REPLY.fields)
    out += [f"-- the egress reply ({protocol.EGRESS_REPLY.name}), in its order",
            f"local function egress_reply({eg})", f"  return {{{eg}}}", "end", ""]
    out += ["-- one row of explain's dry run", f"local function explain_row({row})",
            f"  return {{{row}}}", "end", ""]
    pattern = "^" + "([^|]*)|" * (len(rec) - 1) + "([^\\n]*)\\n(.*)$"
    vals = ", ".join(rec)
    out += ["-- a dialog record: the header fields '|'-joined, a newline, the packed tail",
            f"local REC_PATTERN = '{pattern}'",
            f"local function rec_pack({vals}, tail)",
            "  return " + " .. '|' .. ".join(rec) + " .. '\\n' .. tail", "end", "",
            "local function rec_unpack(s)",
            f"  local {vals}, tail = string.match(s, REC_PATTERN)",
            "  if state == nil then return nil end",
            "  return {" + ", ".join(f"{f} = {f}" for f in rec) + ", tail = tail}", "end", ""]
    for name, lead in (("answer", protocol.DIALOG_ANSWER), ("end", protocol.DIALOG_END)):
        assert rec[:len(lead)] == lead, f"DIALOG must start with {lead}"
        args = ", ".join(lead)
        pat = "^" + "([^|]*)|" * len(lead) + "(.*)$"
        out += [f"-- a record's leading fields an {name} reads ({args}) and the rest as it is",
                f"local REC_{name.upper()} = '{pat}'",
                f"local function rec_{name}(s) return string.match(s, REC_{name.upper()}) end",
                f"local function rec_{name}_pack({args}, rest)",
                "  return " + " .. '|' .. ".join(lead) + " .. '|' .. rest", "end", ""]
    att = protocol.ATTEMPT.fields
    out += ["-- a decided attempt's fields (ATTEMPT), '|'-joined",
            f"local function attempt_pack({', '.join(att)})",
            "  return " + " .. '|' .. ".join(att), "end", ""]
    line = "".join("%" + o.letter if o.letter in "-+" else o.letter
                   for o in protocol.BATCH_OPS if o.line)
    packed = ", ".join(f"['{o.letter}'] = {len(o.fields)}"
                       for o in protocol.BATCH_OPS if not o.line)
    out += ["-- a batch's ops: a line op (letter, dialog id, argument, the next position) in one",
            "-- match; a packed op's letter -> its number of fields",
            f"local OP_LINE = '^([{line}])([^ \\n]*) ?([^\\n]*)\\n()'",
            f"local OP_FIELDS = {{{packed}}}", ""]
    dvals = ", ".join(dec)
    dpattern = "^" + "([^,]*)," * (len(dec) - 1) + "([^,]*)$"
    out += ["-- a decision: its fields ','-joined",
            f"local function dec_pack({dvals})",
            "  return " + " .. ',' .. ".join(dec), "end", "",
            f"local DEC_PATTERN = '{dpattern}'",
            "local function dec_unpack(s)",
            f"  local {dvals} = string.match(s, DEC_PATTERN)",
            "  return {" + ", ".join(f"{f} = {f}" for f in dec) + "}", "end", ""]
    return "\n".join(out)


def _net(name: str, net: IPv4Network | IPv6Network) -> list[object]:
    """A network of a direction as the library's in_net reads it: {direction, family,
    whole 16-bit groups, the divisor of the partial group (0: none), the groups (the
    partial one divided)}."""
    bits = 32 if net.version == 4 else 128
    value = int(net.network_address)
    groups = [(value >> (bits - 16 * (i + 1))) & 0xFFFF for i in range(bits // 16)]
    full, rem = divmod(net.prefixlen, 16)
    out: list[object] = [name, net.version, full, 1 << (16 - rem) if rem else 0]
    out += groups[:full]
    if rem:
        out.append(groups[full] >> (16 - rem))
    return out


def plain_decision() -> str:
    """The decision of a plain admission (every profile joined, nothing tripped or
    shadowed, no max duration), as the library packs it."""
    values = {"admitted": 1, "tripped": 0, "count": 0, "max": -1, "bypass": 0, "shadow": 0,
              "emergency": 0, "kind": 0, "retry": -1, "max_duration": -1, "entry": 1,
              "window": "", "limit": ""}
    return ",".join(str(values[f]) for f in protocol.DECISION.fields)


_cache: list[tuple[weakref.ref[Policy] | None, str, Library]] = []
_cache_lock = threading.Lock()


def compile_policy(policy: Policy | None, namespace: str | None = None,
                   extra: tuple[str, ...] = ()) -> Library:
    """The function library of a policy (``None``: a library with no classification
    and no profiles). ``extra``: Lua appended to the library (more functions over the
    same code: the tests' entry points; a proxy never loads them).

    A policy is a frozen tree, so its library is remembered while the policy lives:
    compiling the same policy object for the same namespace again returns the same
    :class:`Library` (a command, an engine and its store each ask for it)."""
    ns = namespace if namespace is not None else (policy.namespace if policy else "")
    with _cache_lock:
        _cache[:] = [e for e in _cache if e[0] is None or e[0]() is not None]
        for ref, n, lib in _cache:
            if n == ns and (ref() if ref is not None else None) is policy and \
                    lib.extra == extra:
                return lib
    library = _compile(policy, ns, extra)
    with _cache_lock:
        _cache.insert(0, (weakref.ref(policy) if policy is not None else None, ns, library))
        del _cache[_CACHED:]
    return library


def _table(name: str, groups: Sequence[tuple[str, Sequence[str]]]) -> str:
    """``local NAME = {key = class, ...}`` of (class, keys) groups (a key in two groups
    is the later group's). A table of more than TABLE_CHUNK entries is filled by a
    series of functions of TABLE_CHUNK entries each (only the ``redis`` global exists
    while Redis loads a library: no ``pairs`` to merge tables with)."""
    if sum(len(keys) for _, keys in groups) <= TABLE_CHUNK:
        table: dict[str, str] = {}
        for value, keys in groups:
            table.update(dict.fromkeys(keys, value))
        return f"local {name} = {_lua(table)}"
    out = [f"local {name} = {{}}"]
    for value, keys in groups:
        literal = _lua_str(value)
        for i in range(0, len(keys), TABLE_CHUNK):
            chunk = keys[i:i + TABLE_CHUNK]
            if _PLAIN.fullmatch("".join(chunk)) is not None:  # each is its own literal
                fills = 't["' + f'"] = {literal} t["'.join(chunk) + f'"] = {literal}'
            else:
                fills = " ".join(f"t[{_lua_str(k)}] = {literal}" for k in chunk)
            out.append(f"do local function fill(t) {fills} end fill({name}) end")
    return "\n".join(out)


#: Constants every library derives from the compiled ones, once, when Redis loads it:
#: its keys, and numbers made strings once (in Redis 7.0's Lua every number handed to
#: redis.call is formatted with printf, which costs more than most commands).
_DERIVED = f"""local COUNTS = NS_PREFIX .. 'c'
local PARENTS = NS_PREFIX .. 'parents'
local P_DIALOG = NS_PREFIX .. 'd:'
local P_VARS = NS_PREFIX .. 'v:'
local P_NODE = NS_PREFIX .. 'n:'
local NIDX = NS_PREFIX .. 'nidx'
local NODES = NS_PREFIX .. 'nodes'
local STATS = NS_PREFIX .. 'stats'
local DECISIONS = NS_PREFIX .. 'decisions'
local CDR = NS_PREFIX .. 'cdr'
local ATTEMPTS = NS_PREFIX .. 'attempts'
local DECIDED_S = '' .. DECIDED_MS
local CDR_KEEP_S = '' .. CDR_KEEP
local ATTEMPTS_KEEP_S = '' .. ATTEMPTS_KEEP
-- a live record's key lives this long from its admission, so that its answer keeps the
-- TTL (real time; the sweeps end it first), a refreshed one's from its refresh
local KEEP_MS = {KEEP_MS}
local LIVE_TTL_S = '' .. (EARLY_MS + DIALOG_MS + KEEP_MS)
local EARLY_S = '' .. EARLY_MS
-- integers as strings (every number handed to redis.call would be printf'ed as a double)
local INT_S = {{}}
local function ns(n)
  local s = INT_S[n]
  if s then return s end
  s = string.format('%d', n)
  if n >= 0 and n < 4096 then INT_S[n] = s end
  return s
end
local STORE_ENDS = {{node_lost = true, expired = true}}"""


def _compile(policy: Policy | None, ns: str, extra: tuple[str, ...] = ()) -> Library:
    if not ns:
        raise ValueError("a library needs a namespace")
    attrs = attribute_sources(policy)
    index = {s: i + 1 for i, s in enumerate(attrs)}
    exact: list[tuple[str, Sequence[str]]] = []  # (class, its numbers), class by class
    prefix: list[tuple[str, Sequence[str]]] = []
    default: str | None = None
    plan: list[str] = []
    rejects: dict[str, list[object]] = {}
    parent_tables: list[str] = []  # the file's parents of each hierarchy level
    sched_index: dict[str, int] = {}
    if policy is not None:
        for c in policy.classes:
            exact.append((c.name, sorted(c.numbers)))
            prefix.append((c.name, c.prefixes))
            if c.default:
                default = c.name
        sched_index = {name: i + 1 for i, name in enumerate(policy.schedules)}
        for prof in policy.profiles:
            when = ({name: True for name in sorted(prof.when_classes)}
                    if prof.when_classes is not None else None)
            entries = policy.entries(prof.name)
            lua_entries = [_entry(lim, i + 1, policy.shadow, sched_index)
                           for i, lim in enumerate(entries)]
            # a value's own entries: numbered after the profile's (a decision names the
            # entry that tripped by its number)
            own: dict[str, str] = {}
            idx = len(entries)
            for value, ves in policy.value_entries.get(prof.name, {}).items():
                own[value] = "{" + ", ".join(_entry(lim, idx + i + 1, policy.shadow,
                                                    sched_index)
                                             for i, lim in enumerate(ves)) + "}"
                idx += len(ves)
            every = policy.all_entries(prof.name)
            root = policy.root_source(prof) if prof.parent_of is not None else prof.value
            entry = {
                "name": prof.name,
                # the attribute its value comes from (a hierarchy level: at its root; the
                # key its plans are kept by)
                "attr": index[root] if root is not None else 0,
                # a hierarchy level: the profile it is the parent of, and whether a call
                # whose value has no parent is rejected
                "of": prof.parent_of,
                # its value comes from where the call is sent: joined per attempt (egress)
                "gw": root == "gateway" or None,
                "miss": prof.on_missing_parent == "reject" if prof.parent_of else None,
                "when": when,
                "dirs": ({name: True for name in sorted(prof.when_directions)}
                         if prof.when_directions is not None else None),
                # reads its state (rates, windows) from its l: hash
                "state": any(lim.rate is not None or lim.calls for lim in every),
                "sched": any(lim.schedule is not None for lim in every),
            }
            values = ("{" + ", ".join(f"[{_lua_str(v)}] = {es}" for v, es in own.items())
                      + "}") if own else "nil"
            fpar = "nil"
            if prof.parent_of is not None:
                fpar = f"PARENTS[{len(parent_tables) + 1}]"
                by_parent: dict[str, list[str]] = {}
                for child, parent in policy.parents.get(prof.name, {}).items():
                    by_parent.setdefault(parent, []).append(child)
                # (a block of its own: the library's top level may have 200 locals)
                parent_tables.append(f"do\n{_table('T', list(by_parent.items()))}\n"
                                     f"{fpar} = T\nend")
            plan.append("{" + ", ".join(f"{k} = {_lua(v)}" for k, v in entry.items())
                        + ", entries = {" + ", ".join(lua_entries) + "}"
                        + f", values = {values}, fpar = {fpar}}}")
            if entries:
                rejects[prof.name] = _reject(entries[0].reject)
    lengths = sorted(set().union(*(map(len, keys) for _, keys in prefix)), reverse=True)
    # (fraud rules count in calendar windows of the policy's time zone too)
    timed = policy is not None and (policy.timed or bool(policy.fraud))
    tz_at, tz_off = transitions(policy.timezone) if timed and policy else ((), (0,))
    consts: Sequence[tuple[str, object]] = (
        ("SUFFIX", function_suffix(ns)),
        ("NS_PREFIX", f"policer:{{{ns}}}:"),
        ("MAX_VALUE_BYTES", MAX_VALUE * 4),
        ("MAX_KEY_PART", MAX_KEY_PART),
        ("EXACT", None),  # (written by _table)
        ("PREFIX", None),
        ("LENGTHS", lengths),
        ("DEFAULT_CLASS", default),
        ("EMERGENCY_CLASS", policy.emergency_class if policy else None),
        ("EMERGENCY_BYPASS", policy.emergency_bypass if policy else False),
        ("ATTRS", list(attrs)),
        ("ATTRS_SIG", attributes_sig(attrs)),
        ("NUMBER_ATTR", 1),
        ("FROM_USER_ATTR", index["from_user"]),
        ("FROM_DOMAIN_ATTR", index["from_domain"]),
        ("SOURCE_IP_ATTR", index["source_ip"]),
        ("GATEWAY_ATTR", index.get("gateway", 0)),
        ("REJECT_BY_PROFILE", rejects),
        ("DEFAULT_REJECT", _reject(policy.reject if policy else Reject())),
        ("TZ_AT", list(tz_at)),
        ("TZ_OFF", list(tz_off)),
        ("SCHED", [[x for interval in sch.intervals() for x in interval]
                   for sch in (policy.schedules.values() if policy else ())]),
        ("SCHEDULED", policy is not None and any(
            lim.schedule is not None for p in policy.profiles
            for lim in policy.all_entries(p.name))),
        ("MD_DEFAULT", -1 if policy is None or policy.timeouts.max_duration_ms is None
         else policy.timeouts.max_duration_ms),
        ("MD_CLASS", dict(policy.timeouts.max_duration_by_class) if policy else {}),
        ("EARLY_MS", policy.timeouts.early_ms if policy else 120_000),
        ("DIALOG_MS", policy.timeouts.dialog_ms if policy else 43_200_000),
        ("GRACE_MS", GRACE_MS),
        ("DECIDED_MS", DECIDED_MS),
        ("RECOVERY_MS", RECOVERY_MS),
        ("NODE_MARGIN_MS", NODE_MARGIN_MS),
        ("ENDED_CODE", ENDED_CODE),
        ("ENDED_REASON", ENDED_REASON),
        ("CDR_KEEP", policy.call_records_keep if policy else CDR_KEEP_DEFAULT),
        ("ATTEMPTS_KEEP", policy.attempts_keep if policy else ATTEMPTS_KEEP_DEFAULT),
        ("ATTRS_NAMES", ",".join(attrs)),
        ("NATTRS", len(attrs)),
        ("PLAIN_DECISION", plain_decision()),
        ("CLASSES", [c.name for c in policy.classes] if policy else []),
        ("DIRECTIONS", bool(policy and policy.directions)),
        # the directions' names, their networks (in_net's), the default direction
        ("DIRS", {"names": [d.name for d in policy.directions],
                  "nets": [_net(d.name, net) for d in policy.directions
                           for net in d.networks],
                  "default": next((d.name for d in policy.directions if d.default), None)}
         if policy else {"names": [], "nets": []}),
        # the fraud rules (policer.store.lua.lib fraud.lua), in order
        ("FRAUD", _fraud_rules(policy.fraud, index, sched_index) if policy else []),
        ("POLICY_VERSION", policy.version if policy else 0),
        ("LIBRARY_FORMAT", LIBRARY_FORMAT),
    )
    tables = {"EXACT": exact, "PREFIX": prefix}
    lines = [_table(name, tables[name]) if name in tables else f"local {name} = {_lua(value)}"
             for name, value in consts]
    # the fraud events the stream keeps (a field: the library's top level is at Lua's
    # 200 locals)
    lines.append(f"FRAUD.keep = {policy.fraud_events_keep if policy else 10_000}")
    lines.append("local PARENTS = {}")
    lines += parent_tables
    lines.append("local PLAN = {" + ",\n  ".join(plan) + "}")
    lines.append(_DERIVED)
    body = "\n".join(lines) + "\n" + _library_code() + "".join("\n" + x for x in extra)
    # the hash names what the library decides, not where its file was read from
    policy_hash = hashlib.sha1(body.encode("utf-8", "surrogateescape")).hexdigest()
    body = f"local POLICY_SOURCE = {_lua(policy.source if policy else '')}\n" + body
    name = f"policer_{function_suffix(ns)}"
    origin = (policy.source if policy else "-").encode("ascii", "backslashreplace").decode()
    text = (f"#!lua name={name}\n-- compiled by policer from {origin!r}\n"
            f"local POLICY_HASH = {_lua(policy_hash)}\n" + body)
    return Library(ns, name, text, policy_hash, attrs, extra)
