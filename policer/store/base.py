"""The store contract: what every store (Redis, in-process) does, and the
values that cross it.

A store keeps dialog profiles: for every profile (and value) the set of live
dialogs, each with a deadline after which it stops counting. All operations
are atomic; time is the store's own clock (Redis ``TIME`` for the Redis store).
The store knows nothing of SIP or YAML: the engine hands it memberships with
their limits already resolved from the policy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from policer.call import pack_fields, raw_bytes, utf8_text
from policer.classify import Member

if TYPE_CHECKING:
    from policer.calendar import LocalClock
    from policer.call import Call
    from policer.compile import Library
    from policer.policy import Limit, Policy, Rate
    from policer.store.fraud import FraudBlock, FraudEntry, FraudEvent, FraudState

__all__ = [
    "END_REASONS",
    "STATS_FIELDS",
    "AdminStore",
    "AdmitRequest",
    "AdmitResult",
    "Attempt",
    "CallRecord",
    "CallResult",
    "DecisionStore",
    "DialogInfo",
    "EgressResult",
    "ExplainRow",
    "LibraryStore",
    "Member",
    "Op",
    "OpKind",
    "PipelinedStore",
    "Store",
    "StoreError",
    "StoreInfo",
    "TickResult",
    "Usage",
    "pack_ops",
    "usage_of",
]

#: Why a dialog ended (``release(reason=…)``; ``expired``, ``node_lost`` and
#: ``node_restarted`` are the store's own).
END_REASONS = ("bye", "cancel", "failed", "timeout", "expired", "released_by_operator",
               "node_lost", "node_restarted", "reconciled", "duration_cap", "abandoned")

#: Keys of :meth:`Store.stats`.
STATS_FIELDS = ("active", "early", "confirmed", "processed", "expired", "failed", "rejected",
                "ended", "bypassed", "shadow_rejected", "recorded", "nodes_lost")


class StoreError(RuntimeError):
    """The store could not answer (connection lost, timeout, script error).

    ``late``: the store answered that the request came after its caller's deadline and
    wrote nothing. ``maybe_applied``: no answer (a timeout, a connection that broke);
    the request may have been applied, or may still be (its deadline makes the store
    refuse it then)."""

    late = False
    maybe_applied = False


class StoreInfo(NamedTuple):
    """What a node reads about the store once a second (:meth:`DecisionStore.info`)."""

    policy_hash: str | None  # the loaded library's (None: none loaded)
    now_ms: int  # the store's clock, unshifted by any test offset
    epoch: str  # the namespace's state epoch ('' none yet)
    epoch_mark: str  # the library's mark in the server the epoch was confirmed on
    mark: str  # the library's mark in the server answering now (another after a
    # restart or a failover: see the library's VM_MARK)
    #: this process's clock minus the store's (ms), from this reading (midpoint of the
    #: round trip), and the round trip (ms): the reading's error is at most half of it
    skew_ms: float = 0.0
    rtt_ms: float = 0.0


class TickResult(NamedTuple):
    """What one tick call did (:meth:`DecisionStore.tick`)."""

    swept: int  # dialogs of lost nodes ended
    left: int  # own earlier dialogs still to end (start)
    expired: int  # dialogs past their deadline ended
    epoch: str = ""  # the namespace's state epoch after the call
    #: '' the node is this instance's; 'owned:<ms>' another live instance holds it
    owner: str = ""
    lapsed: bool = False  # the node's lease had lapsed before this renewal


#: The dialog events an :class:`Op` carries (a type checker refuses any other).
OpKind = Literal["confirm", "refresh", "release", "set_var", "record", "void"]


class Op(NamedTuple):
    """A dialog event for :meth:`Store.apply` (applied in order, in one call).

    ``kind``: ``confirm`` / ``refresh`` (``arg``: timeout ms, 0 = the policy's dialog
    timeout), ``release`` (``arg``: reason), ``set_var`` (``arg``: name, ``value``),
    ``record`` (``call`` admitted by the fallback at ``node``: count it now; ``arg``:
    when it was decided, the store's clock in ms, 0 = now), ``void`` (the fallback
    rejected the call after its admit request timed out: ``arg`` is that request's
    deadline; the request never counts, whenever it arrives).
    """

    kind: OpKind
    dialog_id: str
    arg: str | int = ""
    value: str = ""
    call: Call | None = None
    node: str = ""


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    dialog_id: str
    members: Sequence[Member]
    early_ms: int
    emergency: bool = False  # may use the slots reserved for emergency calls
    emergency_bypass: bool = False  # admitted over every limit (still counted)
    #: the node (proxy) admitting the call; its dialogs end when its lease lapses
    node: str = ""
    #: record a call the fallback admitted while the store was down: join every profile
    #: without checking limits (counted as ``store_error`` decisions)
    record: bool = False
    #: Strings recorded with the dialog (call_id, from, to, class, node, …).
    info: Mapping[str, str] = field(default_factory=dict)
    #: per member, the limit entry that applies now (its rate and calendar windows);
    #: empty: concurrency only, as ``members`` say
    entries: Sequence[Limit | None] = ()
    #: answered, the call ends after this (ms); None: no cap
    max_duration_ms: int | None = None
    #: when the caller stops waiting (the store's clock): past it nothing is written
    deadline_ms: int | None = None
    #: a hierarchy level (``on_missing_parent: reject``) that has no parent for the
    #: call's value: an ordinary call is rejected by it (kind ``parent``)
    missing_parent: str | None = None
    #: the profiles whose value is where the call is sent (an admit's first attempt):
    #: their trip refuses the gateway, not the call (``AdmitResult.gateway``)
    gateway_profiles: frozenset[str] = frozenset()
    #: the fraud rules the call has a value of the key for,
    #: and its dialled number: evaluated with the decision (the in-process store)
    fraud: tuple[FraudEntry, ...] = ()
    number: str = ""


@dataclass(frozen=True, slots=True)
class AdmitResult:
    """What the store decided. Indexes point into ``AdmitRequest.members``."""

    admitted: bool
    tripped: int = -1  # the member whose limit rejected (or was bypassed), -1 for none
    count: int = 0  # its count at decision time
    max: int = -1  # its effective max (live limit applied)
    bypass: bool = False  # emergency call admitted over a limit
    duplicate: bool = False  # the dialog was decided before: this is that decision
    shadow: int = -1  # the first shadow limit that would have rejected, -1 for none
    kind: str = ""  # concurrent | rate | calls (| parent), of the tripped (or shadow) limit
    retry_after: int = -1  # seconds, computed for rate and calls trips
    window: str = ""  # the calendar window of a calls trip
    max_duration_ms: int | None = None
    #: the limit entry that tripped (or shadowed): the model's own bookkeeping
    entry: Limit | None = field(default=None, compare=False)
    #: kind ``parent``: the hierarchy level whose parent of the call's value is unknown
    parent: str = ""
    #: admitted with its gateway full: that gateway's trip (as a rejection); the call
    #: holds none of the gateway profiles' memberships
    gateway: AdmitResult | None = None
    #: kind ``fraud``: the fraud rule that rejected the call
    rule: str = ""


@dataclass(frozen=True, slots=True)
class ExplainRow:
    """One membership as the decision function's dry run sees it."""

    profile: str
    value: str | None
    count: int
    max: int  # -1 when the profile is only counted
    effective_max: int
    live_limit: bool
    shadow: bool
    would_trip: bool
    #: calls owed to the rate (GCRA: ceil((TAT - now) / T)); -1 when no rate applies
    rate_owed: int = -1
    rate_burst: int = -1
    #: calendar windows: (per, count in the current window, max)
    windows: tuple[tuple[str, int, int], ...] = ()
    kind: str = ""  # of the limit that would trip ("" none)


@dataclass(frozen=True, slots=True)
class CallResult:
    """What the decision function answered for one call (admit, record or explain)."""

    admitted: bool
    code: int
    reason: str
    retry_after: int | None
    limit: str | None  # the profile whose limit tripped (or was bypassed, or shadowed)
    count: int
    max: int
    bypass: bool
    duplicate: bool
    shadow: bool
    number_class: str | None
    memberships: tuple[str, ...]
    dialog_id: str
    emergency: bool
    rows: tuple[ExplainRow, ...] = ()
    kind: str = ""  # concurrent | rate | calls: what tripped (or was bypassed / shadowed)
    window: str = ""  # the calendar window of a ``calls`` trip (``1d``)
    max_duration_ms: int | None = None  # answered calls end after this
    direction: str | None = None  # where the call comes from (directions), None none
    #: the call's first attempt (its attribute ``gateway``) as the admit decided it:
    #: taken with the call, or full (the call is admitted without it: the next gateway
    #: is asked with an egress call); None: not decided (no gateway, a duplicate, a
    #: rejection)
    egress: EgressResult | None = None


@dataclass(frozen=True, slots=True)
class EgressResult:
    """May a live dialog be sent to a gateway (``policer_egress_S``)? Taken: the dialog
    holds the gateway's memberships now (and no earlier attempt's); full: it holds none,
    and ``code``/``reason`` are the tripped limit's answer."""

    taken: bool
    code: int
    reason: str
    retry_after: int | None
    limit: str | None  # the tripped (or bypassed, or shadow) profile
    count: int
    max: int
    kind: str  # concurrent | rate | calls | parent, '' none
    memberships: tuple[str, ...]  # the dialog's gateway memberships now
    known: bool  # False: the store does not know the dialog (taken, nothing counted)
    bypass: bool = False
    shadow: bool = False
    fallback: bool = False  # the store failed: the policy's on_store_error decided
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"taken": self.taken, "code": self.code, "reason": self.reason,
                "retry_after": self.retry_after, "limit": self.limit, "count": self.count,
                "max": self.max, "kind": self.kind or None,
                "memberships": list(self.memberships), "known": self.known,
                "bypass": self.bypass, "shadow": self.shadow, "fallback": self.fallback,
                "error": self.error}


@dataclass(frozen=True, slots=True)
class Usage:
    """Rate and calendar usage of one profile (value) at the store's clock."""

    #: the rate's owed calls / its burst (0..1, above 1 only after emergency bypass);
    #: None when no rate applies
    rate: float | None
    #: per calendar window: its count now
    calls: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class DialogInfo:
    """One dialog as the store keeps it (``policer profile list``, ``dialog show``)."""

    dialog_id: str
    state: str  # early | confirmed | ended (rejected dialogs are not shown)
    init_ms: int
    start_ms: int  # 0 until confirmed
    end_ms: int  # 0 until ended
    deadline_ms: int
    profiles: tuple[str, ...]
    info: Mapping[str, str]
    variables: Mapping[str, str]
    end_reason: str = ""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call-end record, written once per dialog when it ends."""

    dialog_id: str
    call_id: str
    from_uri: str
    to_uri: str
    setup_ms: int
    answer_ms: int
    end_ms: int
    reason: str
    node: str
    profiles: tuple[str, ...]
    variables: Mapping[str, str]
    record_id: str = ""

    @property
    def bill_sec(self) -> int:
        if not self.answer_ms:
            return 0
        return max(0, (self.end_ms - self.answer_ms + 500) // 1000)

    def as_dict(self) -> dict[str, object]:
        """The record with the field names of Kamailio's call-end example."""
        return {
            "CallID": self.call_id,
            "From": self.from_uri,
            "To": self.to_uri,
            "SetupTime": self.setup_ms / 1000,
            "AnswerTime": self.answer_ms / 1000 if self.answer_ms else None,
            "EndTime": self.end_ms / 1000,
            "BillSec": self.bill_sec,
            "Reason": self.reason,
            "Node": self.node,
            "DialogID": self.dialog_id,
            "Profiles": list(self.profiles),
            "Variables": dict(self.variables),
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    """One decided call attempt (one per dialog: a retransmission or a re-sent INVITE
    is the same attempt), as the decision function recorded it (``policer replay``)."""

    time_ms: int  # when it was decided (the store's clock)
    dialog_id: str
    admitted: bool
    recorded: bool = False  # admitted by the fallback while the store was down
    code: int = 200
    limit: str = ""  # the profile whose limit rejected it
    kind: str = ""  # concurrent | rate | calls
    #: call_id, from, to (the number), class, node, source_ip (empty values left out)
    info: Mapping[str, str] = field(default_factory=dict)
    #: the attributes the deciding policy read: source (``from_user`` …,
    #: ``header:<Name>``) -> value
    attributes: Mapping[str, str] = field(default_factory=dict)
    record_id: str = ""


class DecisionStore(Protocol):
    """What an engine and a proxy need on the hot path: decide calls by the loaded
    policy, apply dialog events, the node's tick. Every method may raise
    :class:`StoreError`; nothing else escapes."""

    namespace: str
    #: this process's clock minus the store's (ms), as the node's engine measured it
    clock_skew_ms: float
    #: the namespace's state epoch as this store last saw it (None: not yet)
    epoch: str | None

    def use(self, policy: Policy | None) -> None:
        """Decide by ``policy`` from now on (Redis: compiled here, loaded into Redis when
        it has none for this namespace, or by :meth:`load`)."""

    def load(self, policy: Policy | None, *, epoch: str | None = None) -> str:
        """Make ``policy`` the one every caller decides by (Redis: compile it and
        ``FUNCTION LOAD REPLACE``); returns its hash. ``epoch``: the state epoch op done
        with it (None: the state is whole, a fresh namespace gets an epoch; ``lost:<id>``:
        the store lost its state, admits are held while the nodes put their calls back)."""

    def loaded_hash(self) -> str | None:
        """The hash of the policy the store decides by now (None: none loaded)."""

    def info(self) -> StoreInfo:
        """The loaded policy's hash, the store's clock (and this process's offset to it),
        the state epoch and the server's run id."""

    def deadline_ms(self, budget_ms: int | None = None) -> int:
        """When a request sent now stops being waited for (the store's clock; default
        budget: the store's timeout)."""

    def egress(self, dialog_id: str, gateway: str, deadline_ms: int | None = None
               ) -> EgressResult:
        """Send a live dialog to ``gateway`` if its gateway limits have room (its last
        attempt's gateway is left either way; ``''`` only leaves it). ``deadline_ms``:
        past it (the store's clock) nothing is written."""

    def admit_call(self, call: Call, node: str, record: bool = False,
                   deadline_ms: int | None = None) -> CallResult:
        """Decide one call from its raw attributes by the loaded policy: classify,
        check every limit, join all profiles or none (``record``: join without checking,
        a call the fallback admitted). ``deadline_ms`` (the store's clock): when the
        caller stops waiting; a request that arrives later writes nothing and raises
        :class:`StoreError` with ``late``. Raises StoreError ("recovering") while the
        store's counts are being restored after it lost its state."""

    def explain_call(self, call: Call, at_ms: int | None = None) -> CallResult:
        """The decision ``admit_call`` would make now, with every membership's count
        (``rows``); changes nothing. ``at_ms``: evaluate schedules and calendar windows
        as if it were that instant (the store's clock), with the counts of now."""

    def pack_ops(self, ops: Sequence[Op]) -> bytes:
        """Dialog events in the batch function's format (what a proxy queues for
        :meth:`apply_packed`)."""

    def apply(self, ops: Sequence[Op], records: bool = False) -> list[object]:
        """Apply dialog events in order, in one atomic call. Per op: True/False (confirm,
        refresh, set_var; record: newly counted), for release the call-end record
        (``records``) or True, False when the dialog was not live."""

    def apply_packed(self, packed: bytes) -> int:
        """Apply dialog events packed in the decision function's batch format (a
        proxy's queue); returns how many were read."""

    def get_var(self, dialog_id: str, name: str) -> str | None: ...

    def dialog(self, dialog_id: str) -> DialogInfo | None: ...

    def tick(self, node: str, lease_ms: int, sweep: bool, start: bool = False, *,
             skew_ms: float | None = None, epoch: str = "", instance: str = "",
             renew_ms: int = 0) -> TickResult:
        """A node's periodic duties in one call: renew its lease (register it; as
        ``instance``: with ``start``, a node another live instance renewed within
        ``renew_ms`` is not taken, :attr:`TickResult.owner` says so); with ``sweep``, end
        a bounded number of dialogs of nodes whose lease lapsed; with ``start``, a bounded
        number of this node's earlier dialogs (reason ``node_restarted``); end a bounded
        number of dialogs past their deadline (reason ``expired``); keep the node's clock
        skew; the state epoch op (see :meth:`load`)."""

    def close(self) -> None: ...


class AdminStore(Protocol):
    """What operators' tools need: counts, dialogs, statistics, live limits, call
    records, nodes, and dialog events one at a time (the command line, the exporter,
    ``top``, reconcile, the contract suite). Every method may raise
    :class:`StoreError`; nothing else escapes."""

    namespace: str

    def loaded_hash(self) -> str | None:
        """The hash of the policy the store decides by now (None: none loaded)."""

    def confirm(self, dialog_id: str, dialog_ms: int) -> bool:
        """The dialog was answered: its deadline becomes now + ``dialog_ms``."""

    def refresh(self, dialog_id: str, timeout_ms: int) -> bool:
        """Push a live dialog's deadline to now + ``timeout_ms``."""

    def release(self, dialog_id: str, reason: str) -> CallRecord | None:
        """End a dialog; the call-end record, or None when it was not live (idempotent)."""

    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        """Keep a string with a live dialog (like ``$dlg_var``); False when unknown."""

    def profile_size(self, profile: str, value: str | None = None) -> int:
        """Live dialogs in a profile (for one value of a valued profile)."""

    def profile_values(self, profile: str) -> dict[str, int]:
        """Live dialogs per value of a valued profile."""

    def profile_list(self, profile: str, value: str | None = None) -> list[DialogInfo]: ...

    def stats(self) -> dict[str, int]:
        """Counters, keys as :data:`STATS_FIELDS`."""

    def decisions(self) -> dict[tuple[str, str], int]:
        """Decisions counted per ``(result, profile)``."""

    def ended(self) -> dict[str, int]:
        """Ended dialogs per reason."""

    def limit_get(self, profile: str, value: str) -> int | None: ...

    def limit_set(self, profile: str, value: str, maximum: int) -> int | None:
        """Set a live per-value limit; returns the previous one."""

    def limit_unset(self, profile: str, value: str) -> int | None: ...

    def limits(self, profile: str) -> dict[str, int]: ...

    def parent_set(self, profile: str, value: str, parent: str) -> str | None:
        """Register ``parent`` (a value of the hierarchy level ``profile``) for ``value``
        (a value of the profile it is the parent of); returns the previous live one."""

    def parent_unset(self, profile: str, value: str) -> str | None:
        """Remove a live parent (the file's, if any, applies again); returns it."""

    def parents(self, profile: str) -> dict[str, str]:
        """Every live parent of a hierarchy level: value -> parent."""

    def rate_limit_set(self, profile: str, value: str, rate: Rate | None) -> Rate | None:
        """Set (None: remove) a live call rate for one value; returns the previous one."""

    def calls_limit_set(self, profile: str, value: str, per: str, maximum: int | None
                        ) -> int | None:
        """Set (None: remove) a live calendar cap of one value's ``per`` window (one the
        policy gives the profile); returns the previous one."""

    def usage(self, profile: str, value: str | None) -> Usage:
        """A member's rate and calendar usage now (``profile size``, ``top``, exporter)."""

    def call_records(self, count: int = 100, after: str = "") -> list[CallRecord]:
        """Call-end records, oldest first, after record id ``after``."""

    def attempts(self, since_ms: int = 0, until_ms: int | None = None, count: int = 1000,
                 after: str = "") -> list[Attempt]:
        """Decided attempts, oldest first, recorded from ``since_ms`` to ``until_ms``
        (inclusive; None: now), at most ``count``, after record id ``after`` (paging)."""

    def fraud_events(self, count: int = 100, after: str = "") -> list[FraudEvent]:
        """The last ``count`` fraud events, oldest first; with ``after`` (an event id),
        the first ``count`` after it."""

    def fraud_blocks(self) -> list[FraudBlock]:
        """The values the fraud rules block now."""

    def fraud_lift(self, rules: Sequence[str], value: str) -> list[str]:
        """Lift a value's blocks by these rules; returns those that had one in force."""

    def fraud_states(self, rule: str) -> dict[str, FraudState]:
        """A fraud rule's statistics per value, in their current windows."""

    def fraud_counts(self) -> dict[tuple[str, str, str], int]:
        """Fraud events per (rule, level, statistic), cluster-wide."""

    def nodes(self) -> dict[str, int]:
        """Registered nodes and the end of their lease (ms, the store's clock)."""

    def node_dialogs(self, node: str) -> list[str]:
        """Dialog ids a node admitted that are still recorded."""

    def node_skews(self) -> dict[str, tuple[int, int]]:
        """Each node's clock minus the store's (ms) as the node last measured it, and
        when (the store's clock, ms)."""

    def now_ms(self) -> int:
        """The store's clock (Redis ``TIME``), in ms."""

    def ping(self) -> bool: ...


@runtime_checkable
class Store(DecisionStore, AdminStore, Protocol):
    """Every store (Redis, in-process) implements both protocols with the same meaning."""


@runtime_checkable
class PipelinedStore(Protocol):
    """A store that decides calls that arrived together in one round trip (Redis: their
    ``FCALL``s pipelined), each as :meth:`DecisionStore.admit_call` would."""

    def admit_calls(self, calls: Sequence[Call], node: str, deadline_ms: int | None = None
                    ) -> list[CallResult | StoreError]:
        """Per call its result, or the StoreError of its own reply; a broken connection
        or a timeout raises for all of them."""


@runtime_checkable
class LibraryStore(Protocol):
    """A store whose server holds the compiled policy (Redis: its function library), so
    that a reload can compile and load it away from the decisions, then swap it in."""

    library: Library

    def load_library(self, library: Library, policy: Policy | None = None,
                     epoch: str | None = None) -> str:
        """Load a compiled library into the server without deciding by it here yet;
        returns its policy hash."""

    def use_library(self, library: Library, policy: Policy | None) -> None:
        """Decide by a library compiled (and loaded) already."""


def usage_of(entry: Limit | None, live_rate: Rate | None, tat_us: int,
             windows: Mapping[str, tuple[int, int]], clock: LocalClock, now: int) -> Usage:
    """A member's :class:`Usage` from its state as a store keeps it: the limit entry
    that applies now, a live rate (or None), the rate's theoretical arrival time (us),
    and per window its (id, count) as last spent."""
    rate = live_rate if live_rate is not None else (entry.rate if entry else None)
    used: float | None = None
    if rate is not None:
        used = max(0, tat_us - now * 1000) / (rate.interval_us * rate.burst)
    calls: dict[str, int] = {}
    for w in entry.calls if entry is not None else ():
        wid, n = windows.get(w.per, (-1, 0))
        calls[w.per] = n if wid == clock.window(w.per, now)[0] else 0
    return Usage(used, calls)


#: the line ops of the batch function (protocol.BATCH_OPS) by the event they carry, and
#: what their fields may hold (what an encoded dialog id and a reason word hold)
_LINE_OPS = {"confirm": "+", "refresh": "~", "release": "-"}
_LINE_SAFE = re.compile(r"[A-Za-z0-9_.@%~;:-]*")


def pack_ops(ops: Sequence[Op], attributes: Sequence[str]) -> bytes:
    """Dialog events as the batch function reads them (``attributes``: the call
    attributes a ``record`` op packs, in the library's order)."""
    out = bytearray()
    for op in ops:
        k = op.kind
        if k in _LINE_OPS and _LINE_SAFE.fullmatch(op.dialog_id) \
                and _LINE_SAFE.fullmatch(str(op.arg or "")):
            # an encoded dialog id and a plain argument: the op the function reads with
            # one match (protocol.BATCH_OPS, line ops)
            arg = str(op.arg or "")
            out += (_LINE_OPS[k] + op.dialog_id + (" " + arg if arg else "") + "\n").encode()
        elif k == "confirm":
            out += b"C" + pack_fields((op.dialog_id, str(op.arg or "")))
        elif k == "refresh":
            out += b"F" + pack_fields((op.dialog_id, str(op.arg or "")))
        elif k == "release":
            out += b"R" + pack_fields((op.dialog_id, str(op.arg)))
        elif k == "set_var":
            out += b"V" + pack_fields((op.dialog_id, utf8_text(str(op.arg)),
                                       utf8_text(op.value)))
        elif k == "record" and op.call is not None:
            c = op.call
            attrs = pack_fields([c.attribute(s) for s in attributes])
            fields = (op.node, raw_bytes(c.call_id), raw_bytes(c.from_tag), attrs)
            if op.arg:
                out += b"b" + pack_fields((*fields, "0", str(int(op.arg))))
            else:
                out += b"a" + pack_fields(fields)
        elif k == "void":
            out += b"X" + pack_fields((op.dialog_id, "0", str(int(op.arg))))
        else:
            raise ValueError(f"unknown dialog event {k!r}")
    return bytes(out)
