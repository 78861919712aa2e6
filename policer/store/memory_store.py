"""The in-process store: the same contract as the Redis store, in one process's
memory. It serves a single process with no Redis, and it is the model the Redis
store is tested against (one contract suite runs on both).

Its clock is ``time.time()`` plus ``clock_offset_ms``; tests move that offset to
jump time, exactly as they do with the Redis store.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from policer.calendar import LocalClock
from policer.call import Call, unpack_fields, unpack_values, utf8_text
from policer.classify import Classifier
from policer.compile import (
    DECIDED_MS,
    ENDED_CODE,
    ENDED_REASON,
    GRACE_MS,
    NODE_MARGIN_MS,
    RECOVERY_MS,
    TICK_BATCH,
    attribute_sources,
    compile_policy,
)
from policer.policy import Limit, Policy, Rate, Reject
from policer.protocol import BATCH_OPS
from policer.store.base import (
    STATS_FIELDS,
    AdmitRequest,
    AdmitResult,
    Attempt,
    CallRecord,
    CallResult,
    DialogInfo,
    EgressResult,
    ExplainRow,
    Member,
    Op,
    OpKind,
    StoreError,
    StoreInfo,
    TickResult,
    Usage,
    pack_ops,
    usage_of,
)
from policer.store.fraud import (
    FraudBlock,
    FraudBook,
    FraudEntry,
    FraudEvent,
    FraudState,
    entries_for,
)
from policer.store.keys import dialog_id, key_part, label_from_key, value_from_key

__all__ = ["MemoryStore"]

#: ends the store decided on its own, which a node's record of the call overrides
_STORE_ENDS = frozenset({"node_lost", "expired"})


@dataclass(slots=True)
class _Dialog:
    decision: AdmitResult
    state: str
    init_ms: int
    deadline: int = 0
    expires: int = 0  # when the record itself disappears
    start_ms: int = 0
    end_ms: int = 0
    end_reason: str = ""
    keys: tuple[tuple[str, str], ...] = ()  # (profile, encoded value or "")
    node: str = ""  # the admitting node, encoded ("" none named): whose index holds it
    labels: tuple[str, ...] = ()
    info: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    emergency: bool = False
    max_duration_ms: int | None = None
    cap: int = 0  # answered: it ends here at the latest (answer + max duration)
    #: the deadline of the request that admitted it; of a void: the settled request's
    q: int | None = None
    #: the fraud rules it met and its number (its short calls are counted at the end)
    fraud: tuple[FraudEntry, ...] = ()
    number: str = ""


@dataclass(slots=True)
class _Check:
    """One member's limits as the decision reads them: its max (``live``: a live limit
    set), and its rate and calendar windows as limits.lua's ``check_state`` checks them
    (the first that trips; owed calls, burst and windows for a dry run's rows; the state
    an admission spends)."""

    max_live: int
    live: bool
    kind: str = ""  # rate | calls: the first that trips
    count: int = 0
    max: int = -1
    retry: int = -1
    window: str = ""
    owed: int = -1
    burst: int = -1
    windows: list[tuple[str, int, int]] = field(default_factory=list)
    spend_tat: int = 0
    spend_windows: list[tuple[str, int, int]] = field(default_factory=list)


def _ceil_s(ms: float) -> int:
    return max(1, math.ceil(ms / 1000))


@dataclass(frozen=True, slots=True)
class _Trip:
    """What a member's limits say of this call (decide.lua's ``kind, kcount, kmax,
    kretry, kwin``)."""

    kind: str = ""  # concurrent | rate | calls; "" it passes
    count: int = 0
    max: int = -1
    retry: int = -1
    window: str = ""


def _trip(count: int, effective: int, chk: _Check) -> _Trip:
    """A member's trip: its concurrency first (its count against the effective max),
    else the rate or calendar window ``check_state`` found tripped (the first half of
    the member loop in decide.lua's ``decide``)."""
    if chk.max_live >= 0 and count >= effective:
        return _Trip("concurrent", count, effective)
    if chk.kind:
        return _Trip(chk.kind, chk.count, chk.max, chk.retry, chk.window)
    return _Trip()


def _decide(request: AdmitRequest, keys: Sequence[tuple[str, str]], counts: Sequence[int],
            checks: Sequence[_Check], dry: bool
            ) -> tuple[AdmitResult, tuple[ExplainRow, ...]]:
    """The decision over a call's members from what was read, writing nothing: the
    member loop of decide.lua's ``decide``. The first member whose limit trips rejects
    (a dry run goes on, for its rows); a shadow limit only reports (the first: shadow);
    an emergency call with the bypass is admitted over every limit (the first tripped
    shown, a concurrency trip with its max without the reserve); a record (a call the
    fallback admitted) trips nothing. How a rejection is answered is ``answer_of``'s
    (:func:`_answer`)."""
    emergency = request.emergency or request.emergency_bypass
    tripped, shadow, bypass, shown = -1, -1, False, _Trip()
    soft = request.gateway_profiles
    gateway: AdmitResult | None = None
    rows: list[ExplainRow] = []
    for i, (m, (profile, enc), count, chk) in enumerate(
            zip(request.members, keys, counts, checks, strict=True)):
        effective = chk.max_live if emergency else chk.max_live - m.reserve
        t = _trip(count, effective, chk)
        if dry:
            rows.append(ExplainRow(
                profile, value_from_key(enc) if enc else None, count, chk.max_live,
                effective, chk.live, m.shadow, bool(t.kind), chk.owed, chk.burst,
                tuple(chk.windows), t.kind))
        if not t.kind or request.record:
            continue
        if m.shadow:
            if shadow < 0:
                shadow = i
                if tripped < 0:
                    shown = t
        elif request.emergency_bypass:
            if tripped < 0:
                tripped = i
                shown = replace(t, max=chk.max_live) if t.kind == "concurrent" else t
            bypass = True
        elif m.profile in soft:
            # the call's gateway is full: refused, not the call
            if gateway is None:
                gateway = AdmitResult(False, i, t.count, t.max, kind=t.kind,
                                      retry_after=t.retry, window=t.window,
                                      entry=request.entries[i] if request.entries else None)
        elif tripped < 0:
            tripped, shown = i, t
            if not dry:
                break
    if request.missing_parent and tripped < 0 and not emergency and not request.record:
        # a value whose parent is unknown, at a level that rejects such calls
        missing = AdmitResult(False, kind="parent", parent=request.missing_parent,
                              max_duration_ms=request.max_duration_ms)
        if request.missing_parent not in soft:
            return missing, tuple(rows)
        gateway = gateway or missing
    admitted = tripped < 0 or bypass
    limit = tripped if tripped >= 0 else shadow
    # a Retry-After answers a rejection only (the function's reply has none else)
    return AdmitResult(
        admitted, tripped, shown.count, shown.max, bypass, False, shadow, shown.kind,
        -1 if admitted else shown.retry, shown.window, request.max_duration_ms,
        request.entries[limit] if limit >= 0 and request.entries else None,
        gateway=gateway if admitted else None), tuple(rows)


class MemoryStore:
    """Dialog profiles in this process's memory (thread-safe)."""

    def __init__(self, namespace: str, *, clock_offset_ms: int = 0,
                 cdr_maxlen: int = 100_000, policy: Policy | None = None) -> None:
        self.namespace = namespace
        self._policy: Policy | None = None
        self._hash: str | None = None
        self._classifier: Classifier | None = None
        self.clock_offset_ms = clock_offset_ms
        self._lock = threading.Lock()
        self._dialogs: dict[str, _Dialog] = {}
        self._profiles: dict[tuple[str, str], dict[str, int]] = {}
        self._confirmed: dict[str, int] = {}
        self._stats: dict[str, int] = {}
        self._decisions: dict[tuple[str, str], int] = {}
        self._limits: dict[str, dict[str, int]] = {}
        self._parents: dict[tuple[str, str], str] = {}  # (level, encoded value) -> parent
        self._cdr: deque[CallRecord] = deque(maxlen=cdr_maxlen)
        self._attempts: deque[Attempt] = deque(maxlen=100_000)
        self._attempts_keep = 100_000
        self._seq = itertools.count(1)
        self._nodes: dict[str, int] = {}  # encoded node -> end of its lease
        self._ticked: int | None = None  # when a node last ticked (store clock)
        self._node_dialogs: dict[str, dict[str, int]] = {}  # node -> dialog id -> deadline
        self._admits = 0
        self._clock = LocalClock("UTC")
        self._rates: dict[tuple[str, str], Rate] = {}  # live rates
        self._window_limits: dict[tuple[str, str, str], int] = {}  # live calendar caps
        self._tat: dict[tuple[str, str], int] = {}  # GCRA theoretical arrival time, us
        self._windows: dict[tuple[str, str, str], tuple[int, int]] = {}  # (id, count)
        self.clock_skew_ms = 0.0
        self.epoch: str | None = None
        self._epoch: str | None = None  # the namespace's state epoch (library's P epoch)
        self._hold_until = 0  # admits held until then (P c's '!hold')
        self._owners: dict[str, tuple[str, int]] = {}  # node -> (instance, renewed at)
        self._skews: dict[str, tuple[int, int]] = {}  # node -> (skew ms, measured at)
        self._fraud = FraudBook()
        if policy is not None:
            self.load(policy)

    # -- the policy (the model of the compiled library)
    def load(self, policy: Policy | None, *, epoch: str | None = None) -> str:
        with self._lock:
            self._epoch_op("init" if epoch is None else epoch, self.now_ms())
            self._policy = policy
            self._classifier = Classifier(policy) if policy is not None else None
            self._clock = LocalClock(policy.timezone if policy is not None else "UTC")
            self._hash = (compile_policy(policy, self.namespace).policy_hash
                          if policy is not None else None)
            if policy is not None:
                self._fraud.keep = policy.fraud_events_keep
                self._cdr = deque(self._cdr, maxlen=max(1, policy.call_records_keep))
                self._attempts_keep = policy.attempts_keep
                self._attempts = deque(self._attempts, maxlen=max(1, policy.attempts_keep))
            return self._hash or ""

    def use(self, policy: Policy | None) -> None:
        self.load(policy, epoch="")

    def _epoch_op(self, op: str, now: int) -> str:
        """The library's ``epoch_op``."""
        cur = self._epoch
        if op == "init" or op.startswith(("reload:", "missing:")):  # one process: no
            renew = cur is None  # other server, no library apart from the data
        elif op.startswith("lost:"):
            renew = cur is None or cur == op[5:]
        else:
            renew = False
        if renew:
            cur = self._epoch = f"model-{now}-{next(self._seq)}"
            if op != "init":
                self._hold_until = now + RECOVERY_MS
        return cur or ""

    def info(self) -> StoreInfo:
        return StoreInfo(self._hash, int(time.time() * 1000), self._epoch or "", "model",
                         "model")

    def deadline_ms(self, budget_ms: int | None = None) -> int:
        return self.now_ms() + (50 if budget_ms is None else budget_ms)

    def loaded_hash(self) -> str | None:
        return self._hash

    def _decide_call(self, call: Call, node: str, record: bool, dry: bool,
                     at_ms: int | None = None, deadline_ms: int | None = None,
                     early_ms: int | None = None) -> CallResult:
        policy, classifier = self._policy, self._classifier
        if policy is None or classifier is None:
            raise RuntimeError("no policy loaded in this store")
        now = self.now_ms()
        if not dry and not record:
            if deadline_ms is not None and now > deadline_ms:
                raise _late()
            if now < self._hold_until:
                raise StoreError("POLICER recovering: the counts are being restored")
        with self._lock:
            c = classifier.classify(call, self._parent_of)
        did = dialog_id(call.call_id, call.from_tag)
        at = now if at_ms is None else at_ms
        members, entries = _with_limits(policy, c.members, self._clock.minute_of_week(at))
        md = policy.timeouts.max_duration_by_class.get(c.number_class or "",
                                                       policy.timeouts.max_duration_ms)
        for e in entries:
            if e is not None and e.max_duration_ms is not None \
                    and (md is None or e.max_duration_ms < md):
                md = e.max_duration_ms
        labels = tuple(m.label() if m.value is None else
                       f"{m.profile}={value_from_key(key_part(m.value))}" for m in members)
        frm = call.from_user + ("@" + call.from_domain if call.from_domain else "")
        req = AdmitRequest(
            dialog_id=did, members=members,
            early_ms=policy.timeouts.early_ms if early_ms is None else early_ms,
            deadline_ms=deadline_ms,
            emergency=c.emergency, emergency_bypass=c.emergency and policy.emergency_bypass,
            node=node, record=record,
            info={"call_id": call.call_id, "from": frm, "to": c.number,
                  "class": c.number_class or "", "node": node,
                  "source_ip": call.source_ip},
            entries=entries, max_duration_ms=md, missing_parent=c.missing_parent,
            gateway_profiles=classifier.gateway_profiles,
            fraud=entries_for(policy, call, c.number_class, (m.profile for m in members))
            if policy.fraud and not c.emergency and not record else (),
            number=c.number)
        attrs = {s: call.attribute(s) for s in attribute_sources(policy)}
        r, rows = self._admit(req, dry=dry, at_ms=at, attrs=attrs)
        limit_i = r.tripped if r.tripped >= 0 else r.shadow
        limit = _limit_of(r, members)
        cls = c.number_class
        emergency = c.emergency
        if r.duplicate and r.kind != "ended":  # the answer given before, as it was given
            with self._lock:
                d = self._dialogs.get(did)
            if d is not None:
                labels = tuple(label_from_key(x) for x in d.labels)
                cls = d.info.get("class") or None
                emergency = d.emergency
                limit = labels[limit_i].partition("=")[0] if 0 <= limit_i < len(labels) \
                    else r.rule or r.parent or None
        code, reason, retry = 200, "OK", None
        if r.kind == "ended":
            code, reason = ENDED_CODE, ENDED_REASON
        elif not r.admitted:
            code, reason, retry = _rejection(policy, limit, r)
        egress: EgressResult | None = None
        if r.admitted and not r.duplicate and call.gateway and classifier.gateway_profiles:
            egress = EgressResult(True, 200, "OK", None, None, 0, -1, "", (), True)
            if r.gateway is not None:
                g = r.gateway
                glimit = _limit_of(g, members)
                gcode, greason, gretry = _rejection(policy, glimit, g)
                egress = EgressResult(False, gcode, greason, gretry, glimit, g.count, g.max,
                                      g.kind, (), True)
                labels = tuple(x for x, m in zip(labels, members, strict=True)
                               if m.profile not in classifier.gateway_profiles)
        return CallResult(
            admitted=r.admitted, code=code, reason=reason, retry_after=retry, limit=limit,
            count=r.count, max=r.max, bypass=r.bypass, duplicate=r.duplicate,
            shadow=r.shadow >= 0, number_class=cls, memberships=labels, dialog_id=did,
            emergency=emergency, rows=rows, kind=r.kind, window=r.window,
            max_duration_ms=r.max_duration_ms, direction=c.direction, egress=egress)

    def admit_call(self, call: Call, node: str, record: bool = False,
                   deadline_ms: int | None = None) -> CallResult:
        return self._decide_call(call, node, record, dry=False, deadline_ms=deadline_ms)

    def explain_call(self, call: Call, at_ms: int | None = None) -> CallResult:
        return self._decide_call(call, "", False, dry=True, at_ms=at_ms)

    def apply(self, ops: Sequence[Op], records: bool = False) -> list[object]:
        out: list[object] = []
        policy = self._policy
        dialog_ms = policy.timeouts.dialog_ms if policy else 43_200_000
        for op in ops:
            k = op.kind
            if k == "confirm":
                out.append(self.confirm(op.dialog_id, int(op.arg or 0) or dialog_ms))
            elif k == "refresh":
                out.append(self.refresh(op.dialog_id, int(op.arg or 0) or dialog_ms))
            elif k == "release":
                rec = self.release(op.dialog_id, str(op.arg), op.value)
                out.append(rec if records and rec is not None else rec is not None)
            elif k == "set_var":
                out.append(self.set_var(op.dialog_id, str(op.arg), op.value))
            elif k == "record" and op.call is not None:
                early = None
                if op.arg:  # decided then: counts until its early deadline from then
                    early = int(op.arg) + (policy.timeouts.early_ms if policy else 120_000) \
                        - self.now_ms()
                    if early <= 0:
                        out.append(False)
                        continue
                r = self._decide_call(op.call, op.node, True, dry=False, early_ms=early)
                out.append(not r.duplicate)
            elif k == "void":
                out.append(self.void(op.dialog_id, int(op.arg)))
            else:
                raise ValueError(f"unknown dialog event {k!r}")
        return out

    def pack_ops(self, ops: Sequence[Op]) -> bytes:
        return pack_ops(ops, attribute_sources(self._policy))

    def apply_packed(self, packed: bytes) -> int:
        return len(self.apply(unpack_ops(packed, attribute_sources(self._policy))))

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def _record(self, did: str, now: int) -> _Dialog | None:
        d = self._dialogs.get(did)
        if d is not None and d.expires <= now:
            # the record outlived its end (only when a test moves the clock): forget it
            # and whatever memberships it still held
            self._forget(did, d)
            return None
        return d

    def _forget(self, did: str, d: _Dialog) -> None:
        """Drop a record and the memberships it still holds (the library's ``forget``)."""
        self._dialogs.pop(did, None)
        if d.state in ("early", "confirmed"):
            for key in d.keys:
                self._profiles.get(key, {}).pop(did, None)
            self._node_dialogs.get(d.node, {}).pop(did, None)
            self._confirmed.pop(did, None)

    def void(self, dialog_id: str, deadline_ms: int) -> bool:
        """The library's ``void``: a request its caller gave up on never counts."""
        with self._lock:
            now = self.now_ms()
            d = self._record(dialog_id, now)
            if d is not None and d.state in ("early", "confirmed"):
                if d.q is None or d.q > deadline_ms:
                    return False
                self._end(dialog_id, d, "abandoned", now, quiet=True)
                return True
            if d is not None and (d.state != "void" or (d.q or 0) >= deadline_ms):
                return False
            self._dialogs[dialog_id] = _Dialog(AdmitResult(False), "void", now,
                                               expires=now + DECIDED_MS, q=deadline_ms)
            return True

    def _incr(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    @staticmethod
    def _live(zset: dict[str, int], now: int) -> int:
        """A count: the dialogs not ended yet (one past its deadline counts until a tick's
        sweep ends it, as in the library)."""
        return len(zset)

    def _prune(self, now: int) -> None:
        """Forget decided records past their time (the Redis store's key TTLs); live
        dialogs stay until they are ended (or forgotten on access, as in the library)."""
        for did in [did for did, d in self._dialogs.items()
                    if d.expires <= now and d.state not in ("early", "confirmed")]:
            del self._dialogs[did]

    def _sweep_lost_nodes(self, now: int, batch: int) -> int:
        done = 0
        for node in [n for n, until in sorted(self._nodes.items(), key=lambda kv: kv[1])
                     if until <= now][:4]:
            if done >= batch:
                break
            mine = self._node_dialogs.get(node, {})
            for did in sorted(mine, key=lambda x: (mine[x], x))[:batch - done]:
                d = self._record(did, now)
                if d is not None and self._end(did, d, "node_lost", now) is not None:
                    done += 1
                else:
                    mine.pop(did, None)
            if not mine:
                self._node_dialogs.pop(node, None)
                del self._nodes[node]
                self._incr("nodes_lost")
        return done

    # -- admission: decide.lua's ``decide``, step by step
    def admit(self, request: AdmitRequest) -> AdmitResult:
        return self._admit(request)[0]

    def _admit(self, request: AdmitRequest, dry: bool = False, at_ms: int | None = None,
               attrs: dict[str, str] | None = None
               ) -> tuple[AdmitResult, tuple[ExplainRow, ...]]:
        """One dialog decided over its members and, unless ``dry``, recorded: all or
        none (decide.lua's ``decide``). A dialog decided before is found first
        (:meth:`_existing`); then what the one HMGET reads (:meth:`_read`), the decision
        over it (:func:`_decide`, which writes nothing) and its writes (:meth:`_write`).
        The library decides before its SET NX finds a dialog decided before, and decides
        again once ``existing`` forgot it: the same answer. ``at_ms``: the instant
        calendar windows are read at (explain ``--at``); ``attrs``: the call's attributes,
        kept with its attempt. A dry run returns its rows."""
        with self._lock:
            now = self.now_ms()
            if not dry:
                self._admits += 1
                if self._admits % 1000 == 0:
                    self._prune(now)
                prev = self._record(request.dialog_id, now)
                if prev is not None:
                    again = self._existing(prev, request)
                    if again is not None:
                        return again, ()
            at = now if at_ms is None else at_ms
            keys, counts, checks = self._read(request, now, at, dry)
            result, rows = _decide(request, keys, counts, checks, dry)
            pending = None
            if request.fraud and self._policy is not None:
                # the fraud rules: a block in force, or a critical level reached, rejects
                # with the rule's answer whatever the limits said (fraud.lua's FR.check)
                rule, pending = self._fraud.check(
                    request.fraud, request.number, now, at, self._clock,
                    self._policy.schedules, lambda i: counts[i], dry)
                if rule is not None:
                    result = AdmitResult(False, kind="fraud", rule=rule.name,
                                         max_duration_ms=request.max_duration_ms)
            if not dry:
                self._write(request, keys, checks, result, now, attrs)
                if pending is not None:
                    self._fraud.write(pending, now)
            return result, rows

    def _existing(self, prev: _Dialog, request: AdmitRequest) -> AdmitResult | None:
        """A dialog decided before (decide.lua's ``existing``): its answer again (a
        retransmission, the INVITE re-sent with credentials), or None: it is decided
        anew, its record forgotten with whatever it still counts. Raises the late error
        when this request was settled (void) before it arrived. The model's tombstone
        (the release of a dialog it did not know) is an ended record: the library's
        ``gone``."""
        emergency = request.emergency or request.emergency_bypass
        record = request.record
        if prev.state == "void":
            # a request its caller gave up on, settled by the caller's fallback: this very
            # request (or an older one) arrives late and writes nothing; a later attempt
            # (the INVITE re-sent after the stall) is decided normally
            rq = request.deadline_ms
            if not (record or rq is None or rq > (prev.q or 0)):
                raise _late()
        elif prev.state == "ended":
            # over: an emergency call is always decided (counted as a new call); a record
            # arriving after the release counts nothing, unless the store ended the call
            # itself (_STORE_ENDS); any other admit is a late retransmission or a re-sent
            # Call-ID: rejected, never admitted uncounted
            if not ((emergency and not record)
                    or (record and prev.end_reason in _STORE_ENDS)):
                if not record:
                    self._incr("resent_ended")
                return AdmitResult(False, duplicate=True, kind="ended")
        elif not (prev.state == "rejected" and (emergency or record)):
            # live, or rejected: its decision again (decide.lua's ``repeated``); but an
            # emergency call is always decided, and a call the proxy's fallback admitted
            # (a record) is up, whatever an earlier attempt got
            return replace(prev.decision, duplicate=True)
        self._forget(request.dialog_id, prev)
        return None

    def _read(self, request: AdmitRequest, now: int, at: int, dry: bool
              ) -> tuple[list[tuple[str, str]], list[int], list[_Check]]:
        """What decide.lua's one HMGET reads, member by member: its key (profile,
        encoded value), its count, and its live max, rate and calendar windows as
        limits.lua's ``check_state`` checks them (the windows listed for a dry run's
        rows)."""
        members = request.members
        entries = request.entries or (None,) * len(members)
        keys = [(m.profile, "" if m.value is None else key_part(m.value)) for m in members]
        counts = [self._live(self._profiles.get(key, {}), now) for key in keys]
        checks = [self._check_state(m, entry, key[1], now, at, dry)
                  for m, entry, key in zip(members, entries, keys, strict=True)]
        return keys, counts, checks

    def _check_state(self, m: Member, entry: Limit | None, enc: str, now: int, at: int,
                     rows: bool) -> _Check:
        """A member's live max, and its rate and calendar windows checked at ``now``
        (windows at ``at``) with their spent state: limits.lua's ``check_state`` (the
        live max and caps: the member's live fields in decide.lua's HMGET)."""
        mx, live = m.max, False
        if enc and enc in self._limits.get(m.profile, {}):
            mx, live = self._limits[m.profile][enc], True
        chk = _Check(mx, live)
        rate = entry.rate if entry is not None else None
        interval, tau, burst = ((rate.interval_us, rate.tolerance_us, rate.burst)
                                if rate is not None else (0, 0, 0))
        live_rate = self._rates.get((m.profile, enc)) if enc else None
        if live_rate is not None:
            interval, tau, burst = live_rate.interval_us, live_rate.tolerance_us, \
                live_rate.burst
        key = (m.profile, enc)
        if interval:
            now_us = now * 1000
            tat = max(self._tat.get(key, 0), now_us)
            owed = math.ceil((tat - now_us) / interval)
            chk.owed, chk.burst = owed, burst
            if now_us < tat - tau:
                chk.kind, chk.count, chk.max = "rate", owed, burst
                chk.retry = _ceil_s((tat - tau - now_us) / 1000)
            chk.spend_tat = tat + interval
        for w in entry.calls if entry is not None else ():
            wmax = self._window_limits.get((m.profile, enc, w.per), w.max) if enc else w.max
            wid, wend = self._clock.window(w.per, at)
            sid, n = self._windows.get((m.profile, enc, w.per), (-1, 0))
            n = n if sid == wid else 0
            if rows:
                chk.windows.append((w.per, n, wmax))
            if chk.kind == "" and n >= wmax:
                chk.kind, chk.count, chk.max, chk.window = "calls", n, wmax, w.per
                chk.retry = _ceil_s(wend - at)
            chk.spend_windows.append((w.per, wid, n + 1))
        return chk

    def _write(self, request: AdmitRequest, keys: Sequence[tuple[str, str]],
               checks: Sequence[_Check], result: AdmitResult, now: int,
               attrs: dict[str, str] | None) -> None:
        """The decision written (decide.lua's ``decide`` from its SET NX on): a rejection
        is remembered for the life of an INVITE transaction and spends nothing; an
        admission counts in every member and spends its rates and windows
        (:meth:`_spend`), enters its node's index and counts its decisions
        (:meth:`_count_decisions`); either keeps its attempt (``XADD P attempts``)."""
        did = request.dialog_id
        emergency = request.emergency or request.emergency_bypass
        labels = tuple(m.profile if m.value is None else f"{m.profile}={enc}"
                       for m, (_, enc) in zip(request.members, keys, strict=True))
        if not result.admitted:
            self._dialogs[did] = _Dialog(
                result, "rejected", now, expires=now + DECIDED_MS, labels=labels,
                info={"class": utf8_text(request.info.get("class", ""))},
                emergency=emergency)
            self._incr("rejected")
            prof = result.rule or result.parent or request.members[result.tripped].profile
            res = "fraud" if result.rule else "rejected"
            self._decisions[(res, prof)] = self._decisions.get((res, prof), 0) + 1
            if attrs is not None and self._attempts_keep > 0 and self._policy is not None:
                rej = _answer(self._policy, prof, result.entry, result.kind)
                self._attempt(request, now, attrs, False, rej.code, prof, result.kind)
            return
        deadline = now + request.early_ms
        node = key_part(request.node) if request.node else ""
        if result.gateway is not None:
            # its gateway full: the call holds none of the gateway's memberships
            keep = [i for i, m in enumerate(request.members)
                    if m.profile not in request.gateway_profiles]
            keys = [keys[i] for i in keep]
            checks = [checks[i] for i in keep]
            labels = tuple(labels[i] for i in keep)
            limit = _limit_of(result.gateway, request.members) or ""
            self._decisions[("egress_full", limit)] = \
                self._decisions.get(("egress_full", limit), 0) + 1
        self._dialogs[did] = _Dialog(
            result, "early", now, deadline=deadline, expires=deadline + GRACE_MS,
            keys=tuple(keys), labels=labels, node=node,
            info={k: v for k, v in request.info.items() if v},
            emergency=emergency, max_duration_ms=request.max_duration_ms,
            q=request.deadline_ms, fraud=request.fraud, number=request.number,
        )
        self._spend(did, keys, checks, deadline)
        # the node's index of its dialogs (lease, expiry sweeps, the count of live dialogs)
        self._node_dialogs.setdefault(node, {})[did] = deadline
        self._count_decisions(request, result)
        self._incr("processed")
        if attrs is not None and self._attempts_keep > 0:
            self._attempt(request, now, attrs, True)
        if request.record:
            self._incr("recorded")
        if result.bypass:
            self._incr("bypassed")
        if result.shadow >= 0:
            self._incr("shadow_rejected")

    def _spend(self, did: str, keys: Sequence[tuple[str, str]], checks: Sequence[_Check],
               deadline: int) -> None:
        """Every member counts the dialog and spends its rate and windows: decide.lua's
        one HSET of the counts and spent states."""
        for key, chk in zip(keys, checks, strict=True):
            self._profiles.setdefault(key, {})[did] = deadline
            if chk.spend_tat:
                self._tat[key] = chk.spend_tat
            for per, wid, n in chk.spend_windows:
                self._windows[(key[0], key[1], per)] = (wid, n)

    def _count_decisions(self, request: AdmitRequest, result: AdmitResult) -> None:
        """An admission's decisions, one per member (decide.lua's ``HINCRBY
        DECISIONS``): store_error when recorded, bypassed (the member tripped),
        shadow_rejected (the first shadow limit), else admitted."""
        for i, m in enumerate(request.members):
            if result.gateway is not None and m.profile in request.gateway_profiles:
                continue
            res = ("store_error" if request.record else "bypassed" if i == result.tripped
                   else "shadow_rejected" if i == result.shadow else "admitted")
            self._decisions[(res, m.profile)] = self._decisions.get((res, m.profile), 0) + 1

    def _attempt(self, request: AdmitRequest, now: int, attrs: dict[str, str],
                 admitted: bool, code: int = 200, limit: str = "", kind: str = "") -> None:
        """Keep one decided attempt (the function's ``XADD P attempts``)."""
        self._attempts.append(Attempt(
            time_ms=now, dialog_id=request.dialog_id, admitted=admitted,
            recorded=request.record, code=code, limit=limit, kind=kind,
            info={k: v for k, v in request.info.items() if v},
            attributes=dict(attrs),
            record_id=f"{now}-{next(self._seq)}"))

    def attempts(self, since_ms: int = 0, until_ms: int | None = None, count: int = 1000,
                 after: str = "") -> list[Attempt]:
        with self._lock:
            kept = list(self._attempts)
        if after:
            ids = [a.record_id for a in kept]
            kept = kept[ids.index(after) + 1:] if after in ids else kept
        return [a for a in kept if a.time_ms >= since_ms
                and (until_ms is None or a.time_ms <= until_ms)][:count]

    def _extend(self, did: str, confirm: bool, timeout_ms: int) -> bool:
        with self._lock:
            now = self.now_ms()
            d = self._record(did, now)
            if d is None or d.state not in ("early", "confirmed") or d.deadline <= now:
                return False  # past its deadline: gone for good (its slot may be taken)
            deadline = now + timeout_ms
            if not d.cap and d.max_duration_ms is not None \
                    and (confirm or d.state == "confirmed"):
                d.cap = now + d.max_duration_ms
            if d.cap and d.cap < deadline:
                deadline = d.cap
            for key in d.keys:
                self._profiles.setdefault(key, {})[did] = deadline
            self._node_dialogs.setdefault(d.node, {})[did] = deadline
            if confirm and d.state == "early":
                d.state = "confirmed"
                d.start_ms = now
            if d.state == "confirmed":
                self._confirmed[did] = deadline
            d.deadline = deadline
            d.expires = deadline + GRACE_MS
            return True

    def confirm(self, dialog_id: str, dialog_ms: int) -> bool:
        return self._extend(dialog_id, True, dialog_ms)

    def refresh(self, dialog_id: str, timeout_ms: int) -> bool:
        return self._extend(dialog_id, False, timeout_ms)

    def release(self, dialog_id: str, reason: str, other: str = "") -> CallRecord | None:
        """End a dialog; ``other``: the dialog id by the other tag of a BYE (op ``u``),
        tried when the first names no live dialog. A release of a dialog the store does
        not know leaves it ended (the library's tombstone): a record that comes later
        counts nothing."""
        with self._lock:
            now = self.now_ms()
            d = self._record(dialog_id, now)
            rec = None if d is None else self._end(dialog_id, d, reason, now)
            if rec is not None:
                return rec
            o = None
            if other:
                o = self._record(other, now)
                rec = None if o is None else self._end(other, o, reason, now)
                if rec is not None:
                    return rec
                if o is None:
                    self._tomb(other, reason, now)
            if d is None:
                self._tomb(dialog_id, reason, now)
            return None

    def _tomb(self, did: str, reason: str, now: int) -> None:
        early = self._policy.timeouts.early_ms if self._policy is not None else 120_000
        self._dialogs[did] = _Dialog(AdmitResult(False), "ended", 0, end_ms=now,
                                     end_reason=reason, expires=now + early)

    def _end(self, dialog_id: str, d: _Dialog, reason: str, now: int,
             quiet: bool = False) -> CallRecord | None:
        """End a live dialog (the Lua ``end_dialog``); None when it was not live."""
        if d.state not in ("early", "confirmed"):
            return None
        for key in d.keys:
            zset = self._profiles.get(key)
            if zset is not None:
                zset.pop(dialog_id, None)
                if not zset:
                    del self._profiles[key]
        self._node_dialogs.get(d.node, {}).pop(dialog_id, None)
        self._confirmed.pop(dialog_id, None)
        if d.fraud and d.start_ms and self._policy is not None:
            # an answered call that ended short: the fraud rules' short calls
            self._fraud.short(d.fraud, d.number, d.start_ms, now, self._clock,
                              self._policy.schedules)
        d.state, d.end_ms, d.end_reason = "ended", now, reason
        d.expires = now + DECIDED_MS
        self._incr("ended")
        self._incr("ended:" + reason)
        if reason in ("failed", "cancel"):
            self._incr("failed")
        if reason == "expired":
            self._incr("expired")
        rec = CallRecord(
            dialog_id=dialog_id,
            call_id=d.info.get("call_id", ""),
            from_uri=d.info.get("from", ""),
            to_uri=d.info.get("to", ""),
            setup_ms=d.init_ms,
            answer_ms=d.start_ms,
            end_ms=now,
            reason=reason,
            node=d.info.get("node", ""),
            profiles=tuple(label_from_key(x) for x in d.labels),
            variables=dict(d.variables),
            record_id=f"{now}-{next(self._seq)}",
        )
        if not quiet:
            self._cdr.append(rec)
        return rec

    # -- variables
    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        with self._lock:
            d = self._record(dialog_id, self.now_ms())
            if d is None or d.state not in ("early", "confirmed"):
                return False
            d.variables[utf8_text(name)] = utf8_text(value)
            return True

    def get_var(self, dialog_id: str, name: str) -> str | None:
        with self._lock:
            d = self._record(dialog_id, self.now_ms())
            return None if d is None else d.variables.get(utf8_text(name))

    # -- inspection
    def _info(self, did: str, d: _Dialog) -> DialogInfo:
        return DialogInfo(did, d.state, d.init_ms, d.start_ms, d.end_ms, d.deadline,
                          tuple(label_from_key(x) for x in d.labels),
                          dict(d.info), dict(d.variables), d.end_reason)

    def dialog(self, dialog_id: str) -> DialogInfo | None:
        with self._lock:
            d = self._record(dialog_id, self.now_ms())
            return None if d is None or d.state in ("rejected", "void") or not d.init_ms \
                else self._info(dialog_id, d)

    def profile_size(self, profile: str, value: str | None = None) -> int:
        with self._lock:
            key = (profile, "" if value is None else key_part(value))
            return self._live(self._profiles.get(key, {}), self.now_ms())

    def profile_values(self, profile: str) -> dict[str, int]:
        with self._lock:
            now = self.now_ms()
            out = {}
            for (p, enc), zset in sorted(self._profiles.items()):
                if p == profile and enc:
                    n = self._live(zset, now)
                    if n:
                        out[value_from_key(enc)] = n
            return out

    def profile_list(self, profile: str, value: str | None = None) -> list[DialogInfo]:
        with self._lock:
            now = self.now_ms()
            key = (profile, "" if value is None else key_part(value))
            zset = self._profiles.get(key, {})
            out = []
            for did, _ in sorted(zset.items(), key=lambda kv: (kv[1], kv[0])):
                d = self._record(did, now)
                if d is not None and d.state in ("early", "confirmed"):
                    out.append(self._info(did, d))
            out.sort(key=lambda x: (x.deadline_ms, x.dialog_id))
            return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            now = self.now_ms()
            out = {k: self._stats.get(k, 0) for k in STATS_FIELDS}
            out["confirmed"] = self._live(self._confirmed, now)
            out["active"] = sum(self._live(z, now) for z in self._node_dialogs.values())
            out["early"] = max(0, out["active"] - out["confirmed"])
            return out

    def ended(self) -> dict[str, int]:
        with self._lock:
            return {k[6:]: v for k, v in self._stats.items() if k.startswith("ended:")}

    def decisions(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._decisions)

    # -- live limits
    def limit_get(self, profile: str, value: str) -> int | None:
        with self._lock:
            return self._limits.get(profile, {}).get(key_part(value))

    def limit_set(self, profile: str, value: str, maximum: int) -> int | None:
        with self._lock:
            table = self._limits.setdefault(profile, {})
            old = table.get(key_part(value))
            table[key_part(value)] = maximum
            return old

    def limit_unset(self, profile: str, value: str) -> int | None:
        with self._lock:
            return self._limits.get(profile, {}).pop(key_part(value), None)

    def limits(self, profile: str) -> dict[str, int]:
        with self._lock:
            return {value_from_key(k): v for k, v in self._limits.get(profile, {}).items()}

    def egress(self, dialog_id: str, gateway: str, deadline_ms: int | None = None
               ) -> EgressResult:
        """The library's ``egress``: the dialog leaves its last attempt's gateway and
        takes this one's if its limits have room, all or none."""
        with self._lock:
            now = self.now_ms()
            if deadline_ms is not None and now > deadline_ms:
                raise _late()
            d = self._record(dialog_id, now)
            policy, classifier = self._policy, self._classifier
            if d is None or d.state not in ("early", "confirmed") or policy is None \
                    or classifier is None:
                return EgressResult(True, 200, "OK", None, None, 0, -1, "", (), False)
            held = [k for k in d.keys if k[0] in classifier.gateway_profiles]
            members: tuple[Member, ...] = ()
            missing: str | None = None
            if gateway and classifier.gateway_profiles:
                members, missing = classifier.egress(d.info.get("class") or None,
                                                     d.info.get("source_ip", ""), gateway,
                                                     self._parent_of)
            members, entries = _with_limits(policy, members, self._clock.minute_of_week(now))
            result = AdmitResult(True)
            keys: list[tuple[str, str]] = []
            checks: list[_Check] = []
            if members:
                if self._hold_until > now:
                    raise StoreError("POLICER recovering: the counts are being restored")
                req = AdmitRequest(dialog_id, members, 0, emergency=d.emergency,
                                   emergency_bypass=d.emergency and policy.emergency_bypass,
                                   entries=entries, missing_parent=missing)
                keys, counts, checks = self._read(req, now, now, False)
                counts = [c - 1 if k in held else c for k, c in zip(keys, counts, strict=True)]
                result, _ = _decide(req, keys, counts, checks, False)
            new = keys if result.admitted else []
            for key in held:
                if key not in new:
                    self._profiles.get(key, {}).pop(dialog_id, None)
                    if not self._profiles.get(key, True):
                        del self._profiles[key]
            fresh = [(k, c) for k, c in zip(new, checks, strict=False) if k not in held]
            self._spend(dialog_id, [k for k, _ in fresh], [c for _, c in fresh], d.deadline)
            d.keys = tuple(k for k in d.keys if k not in held) + tuple(new)
            d.labels = tuple(p if not enc else f"{p}={enc}" for p, enc in d.keys)
            limit = _limit_of(result, members)
            if not result.admitted:
                key = ("egress_full", limit or "")
                self._decisions[key] = self._decisions.get(key, 0) + 1
                code, reason, retry = _rejection(policy, limit, result)
                return EgressResult(False, code, reason, retry, limit, result.count,
                                    result.max, result.kind, (), True)
            return EgressResult(
                True, 200, "OK", None, limit, result.count, result.max, result.kind,
                tuple(f"{p}={value_from_key(enc)}" for p, enc in new), True,
                result.bypass, result.shadow >= 0)

    # -- the fraud guard
    def fraud_events(self, count: int = 100, after: str = "") -> list[FraudEvent]:
        with self._lock:
            events = self._fraud.events
            if after:
                events = [e for e in events if _event_after(e.id, after)]
            return list(events[:count]) if after else list(events[-count:])

    def fraud_blocks(self) -> list[FraudBlock]:
        with self._lock:
            return self._fraud.blocks_now(self.now_ms())

    def fraud_lift(self, rules: Sequence[str], value: str) -> list[str]:
        with self._lock:
            return self._fraud.lift(rules, value, self.now_ms())

    def fraud_states(self, rule: str) -> dict[str, FraudState]:
        with self._lock:
            now = self.now_ms()
            return {value_from_key(enc): replace(st).rearmed(now)
                    for (r, enc), st in self._fraud.states.items() if r == rule}

    def fraud_counts(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._fraud.counts)

    def parent_set(self, profile: str, value: str, parent: str) -> str | None:
        with self._lock:
            key = (profile, key_part(value))
            old = self._parents.get(key)
            self._parents[key] = parent
            return old

    def parent_unset(self, profile: str, value: str) -> str | None:
        with self._lock:
            return self._parents.pop((profile, key_part(value)), None)

    def parents(self, profile: str) -> dict[str, str]:
        with self._lock:
            return {value_from_key(enc): v for (p, enc), v in self._parents.items()
                    if p == profile}

    def _parent_of(self, profile: str, value: str) -> str | None:
        """The parent a call's value gets: the live one, else the policy file's (what
        the library's HMGET and its PARENTS tables give)."""
        live = self._parents.get((profile, key_part(value)))
        if live is not None:
            return live
        policy = self._policy
        return policy.parents.get(profile, {}).get(value) if policy is not None else None

    def rate_limit_set(self, profile: str, value: str, rate: Rate | None) -> Rate | None:
        with self._lock:
            key = (profile, key_part(value))
            old = self._rates.pop(key, None)
            if rate is not None:
                self._rates[key] = rate
            self._tat.pop(key, None)  # another rate starts afresh: no debt carried over
            return old

    def calls_limit_set(self, profile: str, value: str, per: str, maximum: int | None
                        ) -> int | None:
        with self._lock:
            key = (profile, key_part(value), per)
            old = self._window_limits.pop(key, None)
            if maximum is not None:
                self._window_limits[key] = maximum
            return old

    def usage(self, profile: str, value: str | None) -> Usage:
        with self._lock:
            now = self.now_ms()
            policy = self._policy
            enc = "" if value is None else key_part(value)
            entry = (policy.limit_at(profile, self._clock.minute_of_week(now), value)
                     if policy is not None else None)
            windows = {w.per: self._windows.get((profile, enc, w.per), (-1, 0))
                       for w in (entry.calls if entry is not None else ())}
            return usage_of(entry, self._rates.get((profile, enc)) if enc else None,
                            self._tat.get((profile, enc), 0), windows, self._clock, now)

    def call_records(self, count: int = 100, after: str = "") -> list[CallRecord]:
        with self._lock:
            records = list(self._cdr)
        if after:
            ids = [r.record_id for r in records]
            records = records[ids.index(after) + 1:] if after in ids else records
        return records[:count]

    # -- nodes
    def tick(self, node: str, lease_ms: int, sweep: bool, start: bool = False, *,
             skew_ms: float | None = None, epoch: str = "", instance: str = "",
             renew_ms: int = 0) -> TickResult:
        with self._lock:
            now = self.now_ms()
            enc = key_part(node) if node else ""
            lapsed = False
            if lease_ms > 0:
                self._stall_credit(now, renew_ms or 5000)
                was = self._nodes.get(enc)
                if instance:
                    if start:
                        o = self._owners.get(enc)
                        if o is not None and was is not None and was > now \
                                and o[0] != instance:
                            free_at = o[1] + (renew_ms or 5000) + NODE_MARGIN_MS
                            if free_at > now:
                                return TickResult(0, 0, 0, self._epoch or "",
                                                  f"owned:{free_at - now}")
                    elif was is None or was <= now:
                        lapsed = True
                    self._owners[enc] = (instance, now)
                self._nodes[enc] = now + lease_ms
                self._node_dialogs.setdefault(enc, {})
            if skew_ms is not None and enc:
                self._skews[enc] = (round(skew_ms), now)
            cur = self._epoch_op(epoch, now)
            if cur:
                self.epoch = cur
            left = 0
            if start:
                mine = self._node_dialogs.get(enc, {})
                for did in sorted(mine, key=lambda x: (mine[x], x))[:TICK_BATCH]:
                    d = self._record(did, now)
                    if d is None or self._end(did, d, "node_restarted", now) is None:
                        mine.pop(did, None)
                left = len(mine)
            swept = self._sweep_lost_nodes(now, TICK_BATCH) if sweep else 0
            expired = self._sweep_expired(now, TICK_BATCH)
            self._fraud.sweep(now)
            return TickResult(swept, left, expired, cur, "", lapsed)

    def _stall_credit(self, now: int, renew_ms: int) -> None:
        # lua/lib/tick.lua stall_credit: the time between two ticks beyond a renew
        # interval (nobody could renew) is added to the leases alive at the earlier one
        last, self._ticked = self._ticked, now
        if last is None or now - last <= renew_ms:
            return
        for n, until in self._nodes.items():
            if until > last:
                self._nodes[n] = until + now - last - renew_ms

    def node_skews(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {value_from_key(n): v for n, v in self._skews.items()}

    def _sweep_expired(self, now: int, batch: int) -> int:
        done = 0
        for node in sorted(self._node_dialogs):
            if done >= batch:
                break
            mine = self._node_dialogs[node]
            for did in sorted((x for x in mine if mine[x] <= now),
                              key=lambda x: (mine[x], x))[:batch - done]:
                d = self._record(did, now)
                # an answered call that reached its max duration (no proxy ended it)
                reason = "duration_cap" if d is not None and d.cap == d.deadline else "expired"
                if d is not None and d.node == node \
                        and self._end(did, d, reason, now) is not None:
                    done += 1
                mine.pop(did, None)
            if not mine and node not in self._nodes:
                del self._node_dialogs[node]
        return done

    def nodes(self) -> dict[str, int]:
        with self._lock:
            return {value_from_key(n): until for n, until in self._nodes.items()}

    def node_dialogs(self, node: str) -> list[str]:
        with self._lock:
            return sorted(self._node_dialogs.get(key_part(node), {}))

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        return None


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


#: op letter -> the kind of op it unpacks to; ``bye`` is a release by either tag of the
#: caller. A line op stands as the packed op of its kind by dialog id. _OPS: a packed
#: op's letter -> (its number of fields, from the protocol's table; its kind); _LINE: a
#: line op's letter -> its kind.
_KINDS: dict[str, OpKind | Literal["bye"]] = {
    "c": "confirm", "f": "refresh", "r": "release", "u": "bye", "v": "set_var",
    "a": "record", "b": "record", "x": "void", "C": "confirm", "F": "refresh",
    "R": "release", "V": "set_var", "X": "void", "+": "confirm", "~": "refresh",
    "-": "release"}
_OPS: dict[bytes, tuple[int, OpKind | Literal["bye"]]] = {
    o.letter.encode(): (len(o.fields), _KINDS[o.letter]) for o in BATCH_OPS if not o.line}
_LINE = {o.letter.encode(): _KINDS[o.letter] for o in BATCH_OPS if o.line}
_LINE_OP = re.compile(rb"([^ \n]*) ?([^\n]*)\n")


def unpack_ops(data: bytes, attributes: Sequence[str] = ()) -> list[Op]:
    """Dialog events packed in the batch function's format (a proxy's queue), as
    :class:`~policer.store.base.Op` s: what ``policer_batch_S`` reads, for the
    in-process store. Stops at the first malformed op, as the function does."""
    ops: list[Op] = []
    pos = 0
    while pos < len(data):
        letter = data[pos:pos + 1]
        line = _LINE.get(letter)
        if line is not None:
            m = _LINE_OP.match(data, pos + 1)
            if m is None:
                break
            pos = m.end()
            did, arg = _text(m.group(1)), m.group(2)
            if line == "release":
                ops.append(Op("release", did, _text(arg)))
            else:
                assert line == "confirm" or line == "refresh"
                ops.append(Op(line, did, int(arg) if arg.isdigit() else 0))
            continue
        spec = _OPS.get(letter)
        if spec is None:
            break
        got = unpack_fields(data, pos + 1, spec[0])
        if got is None:
            break
        f, pos = got
        kind = spec[1]
        if letter.isupper():
            did, rest = _text(f[0]), f[1:]
        elif kind == "record":
            call = _call_from_fields(f[1], f[2], f[3], attributes)
            did = dialog_id(call.call_id, call.from_tag)
            at = _redis_ms(f[4], f[5]) if letter == b"b" else None
            ops.append(Op("record", did, at or 0, call=call, node=_text(f[0])))
            continue
        else:
            did, rest = dialog_id(_text(f[0]), _text(f[1])), f[2:]
        if kind == "bye":  # either tag may name the dialog: the first, else the other
            other = dialog_id(_text(f[0]), _text(rest[0])) if rest[0] else ""
            ops.append(Op("release", did, "bye", other))
        elif kind == "set_var":
            ops.append(Op(kind, did, _text(rest[0]), _text(rest[1])))
        elif kind == "confirm" or kind == "refresh":
            ops.append(Op(kind, did, int(rest[0]) if rest[0].isdigit() else 0))
        elif kind == "release":
            ops.append(Op(kind, did, _text(rest[0])))
        elif kind == "void":
            rq = _redis_ms(rest[0], rest[1])
            if rq is not None:
                ops.append(Op(kind, did, rq))
    return ops


def _redis_ms(s: bytes, add: bytes) -> int | None:
    """The library's ``redis_ms``: a caller's clock reading plus ms, in Redis's clock."""
    try:
        return math.floor(float(s) * 1000 + float(add))
    except ValueError:
        return None


def _late() -> StoreError:
    e = StoreError("ResponseError: POLICER late: the caller gave up on this admit; "
                   "nothing was written, its fallback decides")
    e.late = True
    return e


def _call_from_fields(call_id: bytes, from_tag: bytes, attrs: bytes,
                      attributes: Sequence[str]) -> Call:
    return Call.from_attributes(call_id, from_tag, unpack_values(attrs, attributes))


def _with_limits(policy: Policy, members: Sequence[Member], mow: int
                 ) -> tuple[tuple[Member, ...], tuple[Limit | None, ...]]:
    """The members with the limit entry that applies at local minute of week ``mow``
    (a value's own, else the profile's; schedules picked), and those entries."""
    entries = tuple(policy.limit_at(m.profile, mow, m.value) for m in members)
    return tuple(
        m._replace(max=e.max, reserve=e.reserve_for_emergency,
                   shadow=policy.shadow or e.shadow) if e is not None
        else m._replace(max=-1, reserve=0, shadow=False)
        for m, e in zip(members, entries, strict=True)), entries


def _event_after(event_id: str, after: str) -> bool:
    """A stream id (``ms-seq``) after another."""
    def parts(x: str) -> tuple[int, int]:
        a, _, b = x.partition("-")
        return (int(a) if a.isdigit() else 0, int(b) if b.isdigit() else 0)
    return parts(event_id) > parts(after)


def _limit_of(r: AdmitResult, members: Sequence[Member]) -> str | None:
    """The profile a decision names: the tripped member's (a missing parent's level, a
    fraud rule), else the shadow member's (decide.lua's ``named_limit``)."""
    if r.kind == "parent":
        return r.parent
    if r.kind == "fraud":
        return r.rule
    i = r.tripped if r.tripped >= 0 else r.shadow
    return members[i].profile if 0 <= i < len(members) else None


def _rejection(policy: Policy, limit: str | None, r: AdmitResult
               ) -> tuple[int, str, int | None]:
    """A rejection's code, reason and Retry-After (a rate's or window's computed one)."""
    rej = _answer(policy, limit, r.entry, r.kind)
    retry = r.retry_after if r.kind in ("rate", "calls") else rej.retry_after
    return rej.code, rej.reason, retry if retry is not None and retry >= 0 else None


def _answer(policy: Policy, profile: str | None, entry: Limit | None, kind: str) -> Reject:
    """How a rejection is answered: the tripped entry's ``reject`` (``rate_reject`` for
    a rate); without an entry (explicit memberships) the profile's first."""
    if kind == "fraud":
        return next((r.reject for r in policy.fraud if r.name == profile), policy.reject)
    lim = entry if entry is not None else (policy.limits.get(profile) if profile else None)
    if lim is None:
        return policy.reject
    return lim.rate_answer if kind == "rate" else lim.reject
