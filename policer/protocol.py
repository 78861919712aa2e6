"""The positional structures that cross the boundary between the decision library (Lua,
in Redis), its callers (Python, Kamailio's cfg) and its stored data, each described
once, as a table of named fields. From these tables :mod:`policer.compile` writes the
library's constants and the functions that build and read them, the cfg generator
writes the routes that read a reply, and the Python readers decode; a test proves that
they agree (``tests/test_protocol.py``).

Positions are 1-based in Lua, 0-based in Python and in ``$redis(...=>value[N])``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ADMIT_REPLY", "ATTEMPT", "BATCH_OPS", "DECISION", "DIALOG", "DIALOG_ANSWER",
           "DIALOG_END", "EGRESS_REPLY", "EXPLAIN_ROW", "NATIVE_REPLY", "Fields", "OpSpec"]


@dataclass(frozen=True, slots=True)
class Fields:
    """An ordered list of named fields: a reply, a record, a packed string."""

    name: str
    fields: tuple[str, ...]
    #: what each field holds (documentation, shown in the library's header)
    about: Mapping[str, str]

    def index(self, field: str) -> int:
        """0-based position (Python, the cfg's ``value[N]``)."""
        return self.fields.index(field)

    def lua(self, field: str) -> int:
        """1-based position (Lua)."""
        return self.fields.index(field) + 1

    def decode(self, values: Sequence[Any]) -> dict[str, Any]:
        """The fields of a reply or record by name (missing trailing ones are absent)."""
        return dict(zip(self.fields, values, strict=False))

    def __len__(self) -> int:
        return len(self.fields)


def _fields(name: str, *pairs: tuple[str, str]) -> Fields:
    return Fields(name, tuple(f for f, _ in pairs), dict(pairs))


#: What ``policer_admit_S`` answers (modes a, r, e; explain rows follow it).
ADMIT_REPLY = _fields(
    "admit reply",
    ("admitted", "1 admitted, 0 rejected"),
    ("code", "SIP code"),
    ("reason", "SIP reason"),
    ("retry_after", "Retry-After seconds, -1 none"),
    ("limit", "profile of the tripped (or bypassed, or shadow) limit, '' none"),
    ("count", "its count (a rate: calls owed; a window: its count)"),
    ("max", "its max (a rate: its burst; a window: its cap)"),
    ("bypass", "1: an emergency call admitted over a limit"),
    ("duplicate", "1: the dialog was decided before: this is that decision"),
    ("shadow", "the shadow member that would have rejected (1-based), 0 none"),
    ("tripped", "the tripped member (1-based), 0 none"),
    ("number_class", "the dialled number's class, '' none"),
    ("memberships", "the call's memberships, '\\n'-joined labels profile[=value]"),
    ("dialog_id", "the dialog id"),
    ("emergency", "1: an emergency call"),
    ("kind", "what tripped: concurrent, rate, calls; parent (a hierarchy level with no "
             "parent for the call's value); fraud (a fraud rule: limit is its name); "
             "ended (an ended dialog); '' none"),
    ("window", "the calendar window of a calls trip, '' none"),
    ("max_duration", "an answered call's max duration, ms, -1 none"),
    ("direction", "where the call comes from (directions, by source IP), '' none"),
    ("egress", "the call's gateway (its first attempt, the attribute gateway): 1 taken "
               "with the call, 0 full (the call is admitted without it: try the next "
               "gateway), -1 not decided (no gateway, a duplicate, a rejection)"),
    ("egress_code", "full: the gateway limit's SIP code (else 200 or 0)"),
    ("egress_reason", "full: its SIP reason"),
    ("egress_retry_after", "full: its Retry-After seconds, -1 none"),
    ("egress_limit", "full: the gateway profile whose limit tripped"),
    ("egress_kind", "full: what tripped (concurrent, rate, calls, parent)"),
    ("egress_count", "full: its count"),
    ("egress_max", "full: its max"),
)

#: What ``policer_admit_S`` answers in mode A (a proxy's cfg reads it).
NATIVE_REPLY = _fields(
    "native admit reply",
    *((f, ADMIT_REPLY.about[f]) for f in ("admitted", "code", "reason", "retry_after",
                                          "bypass", "shadow")),
    ("max_duration_s", "an answered call's max duration, s, -1 none"),
    ("dialog_id", "the dialog id (admitted: the cfg keeps it, and its dialog events name "
                  "the dialog by it: the batch's +, ~ and - ops)"),
    ("egress", "the call's gateway ($du when admitted): 1 taken, 0 full (admitted; code, "
               "reason and retry_after are the gateway limit's: try the next gateway), -1 "
               "not decided (ask the egress function)"),
)

#: What ``policer_egress_S`` answers: may a live dialog be sent to a gateway?
EGRESS_REPLY = _fields(
    "egress reply",
    ("taken", "1 the gateway had room and the dialog holds it now, 0 full"),
    ("code", "SIP code (full: the gateway limit's reject)"),
    ("reason", "SIP reason"),
    ("retry_after", "Retry-After seconds, -1 none"),
    ("limit", "profile of the tripped (or bypassed, or shadow) limit, '' none"),
    ("count", "its count (a rate: calls owed; a window: its count)"),
    ("max", "its max (a rate: its burst; a window: its cap)"),
    ("kind", "what tripped: concurrent, rate, calls, parent; '' none"),
    ("memberships", "the dialog's gateway memberships now, '\\n'-joined labels"),
    ("known", "1 a live dialog; 0 the store does not know it (taken, nothing counted)"),
    ("bypass", "1: an emergency call sent over a limit"),
    ("shadow", "1: a shadow limit would have refused it"),
)

#: One membership of explain's dry run (rows follow the admit reply).
EXPLAIN_ROW = _fields(
    "explain row",
    ("profile", "the profile"),
    ("value", "its encoded value, '' none"),
    ("count", "live calls"),
    ("max", "its max, -1 only counted"),
    ("effective_max", "what an ordinary call may reach (max - reserve)"),
    ("live_limit", "1: the max is a live limit"),
    ("shadow", "1: shadow"),
    ("would_trip", "1: this call would trip it"),
    ("rate_owed", "calls owed to its rate, -1 no rate"),
    ("rate_burst", "the rate's burst, -1"),
    ("windows", "its windows, 'per:count:max' lines"),
    ("kind", "what would trip"),
)

#: A dialog's decision, kept in its record (what a duplicate answers).
DECISION = _fields(
    "decision",
    ("admitted", "1|0"),
    ("tripped", "member, 0 none"),
    ("count", "its count"),
    ("max", "its max"),
    ("bypass", "1|0"),
    ("shadow", "member, 0 none"),
    ("emergency", "1|0"),
    ("kind", "0 none, 1 concurrent, 2 rate, 3 calls, 4 parent"),
    ("retry", "Retry-After of a rate or window, -1"),
    ("max_duration", "ms, -1 none"),
    ("entry", "the limit entry that tripped (1-based)"),
    ("window", "the window of a calls trip"),
    ("limit", "the tripped (or shadow) profile"),
)

#: A dialog's record (``P d:<dialog id>``, one string): the header fields, '|'-joined,
#: then a newline and the packed tail (``<length>:<bytes>`` fields: Call-ID, the
#: attributes as the admit carried them). What an answer and an end rewrite comes first
#: (:data:`DIALOG_ANSWER`, :data:`DIALOG_END` fields), so that they read and write the
#: record with one match and one concatenation, the rest of it as it is.
DIALOG = _fields(
    "dialog record",
    ("state", "early, confirmed, ended, rejected, void, gone (the release of a dialog the "
              "store did not know)"),
    ("deadline", "live: it counts until then (ms); else when it was decided or ended (the "
                 "record goes DECIDED_MS later; gone: EARLY_MS; live: GRACE_MS after its "
                 "deadline, script time)"),
    ("start", "when it was answered (ms), 0 not"),
    ("cap", "answered: it ends here at the latest (answer + max duration), 0 none"),
    ("md", "its max duration once answered (ms), -1 none"),
    ("reason", "why it ended"),
    ("node", "the admitting node (encoded), '' none"),
    ("vars", "1: it has dialog variables (P v:<dialog id>)"),
    ("members", "its count fields (profile or profile:value), ','-joined"),
    ("init", "when it was decided (ms)"),
    ("q", "the deadline of the request that admitted it (a void's: the settled one's)"),
    ("class", "the number class"),
    ("sig", "the attributes' signature (ATTRS_SIG of the library that admitted it; P sigs "
            "names them)"),
    ("decision", "its decision (DECISION), ','-joined"),
)

#: A decided attempt (``P attempts`` stream, field ``a``; ``d`` the dialog id, ``x`` the
#: packed Call-ID and attributes), '|'-joined: what ``policer replay`` needs.
ATTEMPT = _fields(
    "attempt",
    ("result", "a admitted, f recorded (a call the fallback admitted), j rejected"),
    ("time", "when it was decided (ms)"),
    ("class", "the number class"),
    ("node", "the deciding node (encoded)"),
    ("sig", "the attributes' signature (P sigs names them)"),
    ("code", "the SIP code"),
    ("limit", "the tripped profile, '' none"),
    ("kind", "what tripped, '' none"),
)

#: The record's leading fields an answer (or a refresh) reads and rewrites.
DIALOG_ANSWER = ("state", "deadline", "start", "cap", "md")
#: The record's leading fields an end reads and rewrites.
DIALOG_END = ("state", "deadline", "start", "cap", "md", "reason", "node", "vars", "members")

#: The packed tail of a dialog record, after the header's newline.
DIALOG_TAIL = ("call_id", "attrs")


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op of ``policer_batch_S``: its letter, what it does, its fields. A packed op
    is the letter and ``<length>:<bytes>`` fields; a line op (``line``) is the letter,
    its first field, each further one after a space, and a newline: for fields that hold
    neither (an encoded dialog id, digits, a reason word), read with one match."""

    letter: str
    does: str
    fields: tuple[str, ...]
    line: bool = False


#: The ops a batch carries.
BATCH_OPS: tuple[OpSpec, ...] = (
    OpSpec("+", "confirm by the encoded dialog id (ms '' = the policy's dialog timeout)",
           ("dialog_id", "ms"), line=True),
    OpSpec("~", "refresh by the encoded dialog id", ("dialog_id", "ms"), line=True),
    OpSpec("-", "release by the encoded dialog id", ("dialog_id", "reason"), line=True),
    OpSpec("c", "confirm (answered; ms '' = the policy's dialog timeout)",
           ("call_id", "from_tag", "ms")),
    OpSpec("f", "refresh: push the deadline to now + ms", ("call_id", "from_tag", "ms")),
    OpSpec("r", "release (idempotent)", ("call_id", "from_tag", "reason")),
    OpSpec("u", "release 'bye' by the first tag that names a live dialog",
           ("call_id", "tag1", "tag2")),
    OpSpec("v", "set a dialog variable", ("call_id", "from_tag", "name", "value")),
    OpSpec("a", "record a call the fallback admitted", ("node", "call_id", "from_tag", "attrs")),
    OpSpec("b", "the same, decided at s*1000+add (Redis's clock)",
           ("node", "call_id", "from_tag", "attrs", "s", "add")),
    OpSpec("x", "void: a request given up on (deadline s*1000+add) never counts",
           ("call_id", "from_tag", "s", "add")),
    OpSpec("C", "confirm by the encoded dialog id", ("dialog_id", "ms")),
    OpSpec("F", "refresh by the encoded dialog id", ("dialog_id", "ms")),
    OpSpec("R", "release by the encoded dialog id", ("dialog_id", "reason")),
    OpSpec("V", "set a variable by the encoded dialog id", ("dialog_id", "name", "value")),
    OpSpec("X", "void by the encoded dialog id", ("dialog_id", "s", "add")),
)


def unpack_record(raw: bytes) -> dict[str, bytes] | None:
    """A dialog record's fields by name (:data:`DIALOG`, and ``tail``: the packed Call-ID
    and attributes); None when it is not one."""
    head, nl, tail = raw.partition(b"\n")
    parts = head.split(b"|")
    if not nl or len(parts) != len(DIALOG):
        return None
    out = dict(zip(DIALOG.fields, parts, strict=True))
    out["tail"] = tail
    return out


def unpack_decision(text: str) -> dict[str, str]:
    """A decision's fields by name (:data:`DECISION`); {} when it is not one."""
    parts = text.split(",")
    if len(parts) != len(DECISION):
        return {}
    return dict(zip(DECISION.fields, parts, strict=True))
