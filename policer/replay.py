"""``policer replay``: what a candidate policy would have decided on recorded traffic.

Every attempt the decision function decided (one per dialog, admitted or rejected) is
kept in the store's attempts stream with the attributes the deciding policy read
(:meth:`policer.store.base.AdminStore.attempts`); the call-end records (``P cdr``) say
when each admitted call was answered and when it ended. :func:`replay` runs those
attempts, in time order and with their real hold times, through the candidate policy
in a fresh in-process :class:`~policer.store.memory_store.MemoryStore` whose clock is
moved to each event's time (``clock_offset_ms``, no sleeps). The live store is only
read.

Hold times: an admitted call holds its slots from its attempt until the end its
call-end record shows (answered at the record's answer time); a call still live holds
them until now (answered when the live dialog says so). A call that was rejected has no
hold time of its own: if the candidate admits it, it is held for the mean hold time of
the calls that ended in the replayed range (an estimate, said as such in the report).
Events at the same millisecond: ends first, then answers, then attempts.

Directions come from each attempt's source IP, as the candidate's ``directions`` say.
Hierarchy levels use the candidate's file parents and the store's live parents as they
are now (the parents at the time of each call are not kept). Gateways: a call whose
call-end record shows it was sent to a gateway (a membership of a gateway profile of the
candidate's name, ``trunk=10.0.0.1:5060``) is sent there again after its admission; a
candidate under whose caps that gateway would have been full counts it in
``gateway_full`` (the proxy would have tried its next gateway, which replay cannot know).
Fraud rules: the candidate's are evaluated on every attempt (a short call by its
recorded answer and end); the report says which values they would have blocked, and
when (``blocked``), and how many events each rule, level and statistic raised.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policer.call import Call
from policer.policy import Policy
from policer.store.base import AdminStore, Attempt, CallRecord, DecisionStore, Op, Store
from policer.store.keys import split_dialog_id
from policer.store.memory_store import MemoryStore

__all__ = ["ReplayReport", "read_attempts", "read_records", "replay", "replay_store"]

#: How many changed calls the report lists.
CHANGED_SHOWN = 100

_END, _ANSWER, _ATTEMPT = 0, 1, 2  # order of events at the same millisecond


@dataclass
class ReplayReport:
    """What the candidate decided, beside what actually happened."""

    attempts: int = 0
    admitted: int = 0
    rejected: int = 0
    by_limit: Counter[str] = field(default_factory=Counter)  # profile -> rejections
    by_value: Counter[str] = field(default_factory=Counter)  # profile=value -> rejections
    actual_admitted: int = 0
    actual_rejected: int = 0
    peak: dict[str, int] = field(default_factory=dict)  # profile[=value] -> peak live
    changed: list[dict[str, Any]] = field(default_factory=list)  # the first CHANGED_SHOWN
    changed_total: int = 0
    estimated_holds: int = 0  # admitted here, rejected in fact: held for the mean
    mean_hold_ms: int = 0
    #: profile=gateway -> calls the candidate's caps would have refused at the gateway
    #: they were sent to (the proxy would have tried its next one)
    gateway_full: Counter[str] = field(default_factory=Counter)
    missing_attributes: Counter[str] = field(default_factory=Counter)
    #: the candidate's fraud events per rule|level|stat, and the values its rules would
    #: have blocked: {rule, key, value, stat, count, threshold, at, until} (critical
    #: events of rules that block; shadow rules' are listed with until None)
    fraud_events: Counter[str] = field(default_factory=Counter)
    blocked: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``policer replay --json``)."""
        return {
            "attempts": self.attempts,
            "admitted": self.admitted,
            "rejected": self.rejected,
            "by_limit": dict(self.by_limit.most_common()),
            "actual": {"admitted": self.actual_admitted, "rejected": self.actual_rejected},
            "peak": dict(sorted(self.peak.items())),
            "changed": self.changed,
            "gateway_full": dict(self.gateway_full.most_common()),
            "fraud": {"events": dict(sorted(self.fraud_events.items())),
                      "blocked": self.blocked},
        }


def read_attempts(store: AdminStore, since_ms: int = 0, until_ms: int | None = None,
                  page: int = 10_000) -> list[Attempt]:
    """Every attempt the store keeps in the range, oldest first."""
    out: list[Attempt] = []
    after = ""
    while True:
        got = store.attempts(since_ms, until_ms, page, after)
        out += got
        if len(got) < page:
            return out
        after = got[-1].record_id


def read_records(store: AdminStore, page: int = 10_000) -> list[CallRecord]:
    """Every call-end record the store keeps, oldest first."""
    out: list[CallRecord] = []
    after = ""
    while True:
        got = store.call_records(page, after)
        out += got
        if len(got) < page:
            return out
        after = got[-1].record_id


def _decision(admitted: bool, code: int, limit: str, kind: str) -> dict[str, Any]:
    if admitted:
        return {"admitted": True}
    return {"admitted": False, "code": code, "limit": limit, "kind": kind}


def _call(a: Attempt) -> Call:
    """The attempt as a call the candidate can classify again."""
    cid, tag = split_dialog_id(a.dialog_id)
    return Call.from_attributes(a.info.get("call_id") or cid, tag, a.attributes)


def replay(candidate: Policy, attempts: Sequence[Attempt], records: Iterable[CallRecord],
           now_ms: int, answered: Mapping[str, int] | None = None,
           parents: Mapping[str, Mapping[str, str]] | None = None) -> ReplayReport:
    """Run ``attempts`` through ``candidate`` in a fresh in-process store.

    ``records``: call-end records (joined to attempts by dialog id and setup time);
    ``now_ms``: the end of the replay (calls still live hold until then); ``answered``:
    dialog id -> answer time of admitted calls still live (0: unanswered); ``parents``:
    live parents per hierarchy level (value -> parent), over the candidate's file's."""
    answered = answered or {}
    ends = {(r.dialog_id, r.setup_ms): r for r in records}
    held = [r.end_ms - r.setup_ms for r in ends.values() if r.end_ms >= r.setup_ms]
    mean_hold = sum(held) // len(held) if held else 0
    report = ReplayReport(mean_hold_ms=mean_hold)
    needed = set(_sources(candidate)) - {"gateway"}  # (joined per attempt, not recorded)
    gateway_profiles = {p.name for p in candidate.profiles
                        if candidate.root_source(p) == "gateway" and p.value is not None}
    gateways: dict[int, str] = {}  # seq -> the gateway its call was sent to
    # events: (ms, order, seq, kind arg); seq keeps the stream's order within a millisecond
    events: list[tuple[int, int, int, Attempt]] = []
    plan: dict[int, tuple[int, int]] = {}  # seq -> (answer ms or 0, end ms or -1)
    for seq, a in enumerate(attempts):
        events.append((a.time_ms, _ATTEMPT, seq, a))
        rec = ends.get((a.dialog_id, a.time_ms))
        if rec is not None:
            plan[seq] = (rec.answer_ms, rec.end_ms)
            for label in rec.profiles:
                name, eq, value = label.partition("=")
                if eq and name in gateway_profiles:
                    gateways[seq] = value
                    break
        elif a.admitted:
            plan[seq] = (answered.get(a.dialog_id, 0), -1)  # still live: until now
        else:
            plan[seq] = (0, a.time_ms + mean_hold)  # an estimate, used if admitted here
        answer, end = plan[seq]
        if answer:
            events.append((answer, _ANSWER, seq, a))
        if end >= 0:
            events.append((end, _END, seq, a))
    events = sorted((e for e in events if e[0] <= now_ms), key=lambda e: (e[0], e[1], e[2]))

    store = MemoryStore(candidate.namespace, policy=candidate)
    for level, table in (parents or {}).items():
        for value, parent in table.items():
            store.parent_set(level, value, parent)
    live: Counter[str] = Counter()
    admitted_here: dict[int, tuple[str, tuple[str, ...]]] = {}  # seq -> (did, labels)
    for ms, kind, seq, a in events:
        store.clock_offset_ms = ms - int(time.time() * 1000)
        if kind == _ATTEMPT:
            _attempt(report, store, live, admitted_here, needed, seq, a)
            if seq in admitted_here and seq in gateways:
                _egress(report, store, live, admitted_here, seq, gateways[seq])
        elif seq in admitted_here:
            did, labels = admitted_here[seq]
            if kind == _ANSWER:
                store.apply([Op("confirm", did, 0)])
            else:
                store.apply([Op("release", did, "bye")])
                del admitted_here[seq]
                for label in labels:
                    live[label] -= 1
    if candidate.fraud:
        _fraud(report, store)
    return report


def _fraud(report: ReplayReport, store: MemoryStore) -> None:
    """What the candidate's fraud rules raised: events per rule, level and statistic;
    the values they would have blocked, and when."""
    for e in store.fraud_events(count=1_000_000):
        report.fraud_events[f"{e.rule}|{e.level}|{e.stat}"] += 1
        if e.level == "critical":
            report.blocked.append({
                "rule": e.rule, "key": e.key, "value": e.value, "stat": e.stat,
                "count": e.count, "threshold": e.threshold, "at": e.at_ms,
                "until": e.at_ms + e.block_ms if e.action == "block" else None})


def _egress(report: ReplayReport, store: MemoryStore, live: Counter[str],
            admitted_here: dict[int, tuple[str, tuple[str, ...]]], seq: int,
            gateway: str) -> None:
    """An admitted call sent to the gateway it went to in fact."""
    did, labels = admitted_here[seq]
    r = store.egress(did, gateway)
    if not r.taken:
        report.gateway_full[f"{r.limit or '-'}={gateway}"] += 1
        return
    admitted_here[seq] = (did, labels + r.memberships)
    for label in r.memberships:
        live[label] += 1
        if live[label] > report.peak.get(label, 0):
            report.peak[label] = live[label]


def _sources(policy: Policy) -> list[str]:
    from policer.compile import attribute_sources

    return list(attribute_sources(policy))


def _attempt(report: ReplayReport, store: DecisionStore, live: Counter[str],
             admitted_here: dict[int, tuple[str, tuple[str, ...]]], needed: set[str],
             seq: int, a: Attempt) -> None:
    report.attempts += 1
    if a.admitted:
        report.actual_admitted += 1
    else:
        report.actual_rejected += 1
    for s in needed - a.attributes.keys():
        report.missing_attributes[s] += 1
    r = store.admit_call(_call(a), a.info.get("node", ""))
    if r.admitted:
        report.admitted += 1
        admitted_here[seq] = (r.dialog_id, r.memberships)
        if not a.admitted:
            report.estimated_holds += 1
        for label in r.memberships:
            live[label] += 1
            if live[label] > report.peak.get(label, 0):
                report.peak[label] = live[label]
    else:
        report.rejected += 1
        limit = r.limit or ""
        report.by_limit[limit] += 1
        for label in r.memberships:
            if label.partition("=")[0] == limit and "=" in label:
                report.by_value[label] += 1
                break
    cand = _decision(r.admitted, r.code, r.limit or "", r.kind)
    actual = _decision(a.admitted, a.code, a.limit, a.kind)
    if cand != actual:
        report.changed_total += 1
        if len(report.changed) < CHANGED_SHOWN:
            report.changed.append({"call_id": a.info.get("call_id", ""),
                                   "dialog_id": a.dialog_id, "time_ms": a.time_ms,
                                   "actual": actual, "candidate": cand})


def replay_store(candidate: Policy, store: Store, since_ms: int = 0,
                 until_ms: int | None = None) -> ReplayReport:
    """Replay what ``store`` recorded from ``since_ms`` to ``until_ms`` (None: now)
    under ``candidate``. Reads the store only."""
    now = store.now_ms()
    attempts = read_attempts(store, since_ms, until_ms)
    records = read_records(store)
    joined = {(r.dialog_id, r.setup_ms) for r in records}
    answered: dict[str, int] = {}
    for a in attempts:
        if a.admitted and (a.dialog_id, a.time_ms) not in joined:
            d = store.dialog(a.dialog_id)
            if d is not None and d.init_ms == a.time_ms and d.start_ms:
                answered[a.dialog_id] = d.start_ms
    end = now if until_ms is None else min(now, until_ms)
    parents = {p.name: store.parents(p.name) for p in candidate.profiles
               if p.parent_of is not None}
    return replay(candidate, attempts, records, end, answered, parents)
