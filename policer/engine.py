"""The engine: the decision API the proxies' adapters call (Kamailio's KEMI glue and
native timer, ``policer serve``; also the command line's ``admit`` and ``explain``, and
``policer simulate``). An INVITE is one call of the store's decision function, which
classifies the call, checks every limit and joins all profiles or none; the engine
turns its answer into a :class:`Decision`. Dialog events are applied in order, or
queued while the store fails. The node's start, lease and tick are composed from
:mod:`policer.node`.

The engine never raises at the proxy: when the store fails or is too slow, the
policy's ``on_store_error`` decides (the engine classifies the call itself then:
emergency calls are always admitted) and the decision says it came from that fallback.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policer.call import Call
from policer.classify import Classification, Classifier
from policer.compile import Library, compile_policy
from policer.decision import Decision, EngineMetrics
from policer.log import get_logger
from policer.metrics import worker_metrics
from policer.node import NodeInUse, NodeLifecycle, SkewEstimate
from policer.policy import Policy, Reject, load_policy
from policer.reload import PolicyWatcher
from policer.resilience import CircuitBreaker, Pending, PendingQueue
from policer.store import Store, StoreError, open_store
from policer.store.base import (
    CallRecord,
    CallResult,
    DialogInfo,
    EgressResult,
    ExplainRow,
    LibraryStore,
    Op,
    PipelinedStore,
)
from policer.store.keys import dialog_id

if TYPE_CHECKING:
    from policer.reconcile import ProxyDialog, Report

__all__ = ["Decision", "Engine", "EngineMetrics", "Explanation", "NodeInUse",
           "Prepared", "SkewEstimate"]


#: The store an engine built from the environment uses without ``POLICER_REDIS_URL``.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_OK = Reject(code=200, reason="OK", retry_after=None)
#: Queued operations applied before a dialog event (the rest wait for later events or
#: tick()).
_DRAIN_BEFORE_EVENT = 200
_DRAIN_PER_TICK = 5_000
#: Queued operations per store call.
_BATCH = 200
#: The call of :meth:`Engine.probe`'s dry run.
_PROBE_CALL = Call.from_raw("policer-probe", "probe")


@dataclass(frozen=True, slots=True)
class Explanation:
    """What ``admit`` would decide now (``policer explain``, ``POST /v1/explain``): the
    number, its class, every membership as the store's dry run saw it, the decision."""

    number: str
    number_class: str | None
    emergency: bool
    limits: tuple[ExplainRow, ...]
    decision: Decision

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "class": self.number_class,
            "emergency": self.emergency,
            "direction": self.decision.direction,
            "limits": [
                {
                    "profile": v.profile,
                    "value": v.value,
                    "count": v.count,
                    "max": v.max if v.max >= 0 else None,
                    "effective_max": v.effective_max if v.max >= 0 else None,
                    "live_limit": v.live_limit,
                    "shadow": v.shadow,
                    "would_trip": v.would_trip,
                    "kind": v.kind or None,
                    "rate": None if v.rate_owed < 0 else
                    {"owed": v.rate_owed, "burst": v.rate_burst},
                    "calls": [{"window": per, "count": n, "max": mx}
                              for per, n, mx in v.windows],
                }
                for v in self.limits
            ],
            "decision": self.decision.as_dict(),
        }


@dataclass(slots=True)
class _Current:
    """The policy in force and what is derived from it (swapped whole on reload)."""

    policy: Policy
    classifier: Classifier


@dataclass(frozen=True, slots=True)
class Prepared:
    """A new policy made ready for :meth:`Engine.install` (by :meth:`Engine.prepare`,
    in any thread): its classifier, and with a Redis store its library, compiled and
    loaded into Redis (or the error that load met)."""

    policy: Policy
    classifier: Classifier
    library: Library | None = None
    policy_hash: str = ""
    error: StoreError | None = None


class Engine:
    """Admission decisions for one policy over one store.

    Thread- and fork-safe: the Redis store opens its connection per process.
    """

    def __init__(self, policy: Policy, store: Store, *, node: str | None = None,
                 metrics: EngineMetrics | None = None, lease: bool = False,
                 watch: str | Path | None = None, watch_interval: float = 1.0) -> None:
        """``lease``: this engine is a proxy node holding a lease (see :meth:`start`,
        :meth:`tick`); ``watch``: reload the policy when this file changes."""
        self._current = _Current(policy, Classifier(policy))
        self.store = store
        store.use(policy)  # compiled here; loaded into Redis on first need or by start()
        self.node = node or os.environ.get("POLICER_NODE") or socket.gethostname()
        self.log = get_logger("policer.engine").bind(node=self.node)
        self.metrics = metrics
        self.lease = lease
        self.breaker = CircuitBreaker()
        self.pending = PendingQueue(policy.pending_queue)
        self._watcher = (PolicyWatcher(watch, self.install, watch_interval,
                                       on_result=self._reload_result, prepare=self.prepare,
                                       files=policy.files)
                         if watch is not None else None)
        #: the node's start, lease, tick, library and resync (not its decisions)
        self.lifecycle = NodeLifecycle(
            self.node, store, lambda: self._current.policy, self.log, failed=self._failed,
            answered=self._answered, store_error=self._store_error,
            reloading=lambda: self._watcher is not None and self._watcher.busy)

    # -- construction
    @classmethod
    def from_env(cls, policy_path: str | None = None, redis_url: str | None = None,
                 lease: bool = True, watch: bool = True) -> Engine:
        """The composition root of a proxy node's engine: ``POLICER_POLICY`` (required),
        ``POLICER_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and ``POLICER_NODE``;
        this process's worker metrics. It holds a node lease (``lease``) and its
        :meth:`tick` reloads the policy file when it changes (``watch``).

        Raises :class:`ValueError` naming ``POLICER_POLICY`` when it is unset, and
        :class:`policer.policy.PolicyError` when the file is missing or invalid."""
        path = policy_path or os.environ.get("POLICER_POLICY")
        if not path:
            raise ValueError("POLICER_POLICY is not set: set it to the policy file this "
                             "proxy enforces (e.g. /etc/policer/policy.yaml)")
        policy = load_policy(path)
        url = redis_url or os.environ.get("POLICER_REDIS_URL") or DEFAULT_REDIS_URL
        store = open_store(url, policy.namespace, timeout_ms=policy.store_timeout_ms)
        return cls(policy, store, metrics=worker_metrics(), lease=lease,
                   watch=path if watch else None)

    @property
    def policy(self) -> Policy:
        return self._current.policy

    @property
    def watcher(self) -> PolicyWatcher | None:
        """The watcher of the policy file that :meth:`tick` polls (None: none)."""
        return self._watcher

    @watcher.setter
    def watcher(self, watcher: PolicyWatcher | None) -> None:
        """An adapter's own watcher (the native flavour swaps its htables too)."""
        self._watcher = watcher

    def reload(self, policy: Policy) -> None:
        """Swap in a new, already validated policy; the next INVITE uses it. (In this
        thread: :meth:`prepare`, then :meth:`install`.)"""
        self.install(self.prepare(policy))

    def prepare(self, policy: Policy) -> Prepared:
        """Everything a reload does that takes time, in any thread and changing nothing
        this engine decides by: the classifier, and with a Redis store the library,
        compiled and loaded into Redis (every proxy decides by it from then on; a load
        that failed is kept in the result, to be logged and loaded again later).
        Raises ValueError for a policy of another namespace."""
        if policy.namespace != self.store.namespace:
            raise ValueError(
                f"the new policy's namespace {policy.namespace!r} differs from the store's "
                f"{self.store.namespace!r}; restart to change namespaces"
            )
        classifier = Classifier(policy)
        store = self.store
        if not isinstance(store, LibraryStore):
            return Prepared(policy, classifier)
        library = compile_policy(policy, self.store.namespace)
        try:
            policy_hash = store.load_library(library, policy)
        except StoreError as e:
            return Prepared(policy, classifier, library, "", e)
        return Prepared(policy, classifier, library, policy_hash)

    def install(self, prepared: Prepared) -> None:
        """Swap in a prepared policy, whole and at once (quick: nothing is compiled or
        loaded here)."""
        policy = prepared.policy
        self._current = _Current(policy, prepared.classifier)
        self.pending.maxlen = policy.pending_queue
        policy_hash = prepared.policy_hash
        store = self.store
        if isinstance(store, LibraryStore) and prepared.library is not None:
            store.use_library(prepared.library, policy)
        else:
            try:  # every proxy decides by the new policy from this instant on
                policy_hash = self.store.load(policy)
            except StoreError as e:
                prepared = Prepared(policy, prepared.classifier, error=e)
        if prepared.error is not None:  # loaded later (tick, first call)
            self._store_error("load", "", prepared.error)
        self.lifecycle.installed(policy_hash)
        self.log.info("policy_reloaded", source=policy.source, policy_hash=policy_hash)

    def poll_policy(self, wait: float | None = None) -> bool:
        """Reload the watched policy file if it changed (a ``stat`` at most once per
        watch interval; cheap): read, compiled and loaded in the background, swapped in
        by a later poll (each waits for it at most ``wait`` seconds, default 0.5).
        :meth:`tick` does it; so do the Kamailio KEMI workers after a dialog event,
        never inside an INVITE's decision. True when a new policy was swapped in."""
        return self._watcher.poll(wait) if self._watcher is not None else False

    def _reload_result(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reload(result)

    # -- the hot path
    def admit(self, call: Call, deadline_ms: int | None = None) -> Decision:
        """Decide one initial INVITE: one call of the store's decision function, nothing
        else (the policy file and the queue of operations the store missed are the
        business of :meth:`tick`). The request carries the instant this engine stops
        waiting for it (the store's clock, :meth:`DecisionStore.deadline_ms`): arriving
        later (Redis paused, slow), it writes nothing. Never raises."""
        t0 = time.perf_counter()
        if not self.breaker.allow():
            return self._fallback(call, "circuit open: the store failed repeatedly", t0)
        deadline = self.store.deadline_ms() if deadline_ms is None else deadline_ms
        try:
            r = self.store.admit_call(call, self.node, deadline_ms=deadline)
        except StoreError as e:
            return self.admit_failed(call, e, t0, deadline)
        except Exception as e:  # defensive: a bug here must not drop the INVITE
            return self._fallback(call, f"admit: {e!r}", t0)
        return self.admit_reply(call, r, t0)

    def admit_many(self, calls: list[Call], deadline_ms: int | None = None) -> list[Decision]:
        """:meth:`admit` for calls that arrived together (the decision service's
        worker): one round trip for all of them when the store can pipeline, each
        decided as :meth:`admit` would (``deadline_ms``: when the caller stops waiting,
        the store's clock; default the store's timeout from now). Never raises."""
        store = self.store
        if not isinstance(store, PipelinedStore) or len(calls) == 1:
            return [self.admit(call, deadline_ms) for call in calls]
        t0 = time.perf_counter()
        if not self.breaker.allow():
            return [self._fallback(call, "circuit open: the store failed repeatedly", t0)
                    for call in calls]
        deadline = self.store.deadline_ms() if deadline_ms is None else deadline_ms
        try:
            results = store.admit_calls(calls, self.node, deadline)
        except StoreError as e:  # one failure of the store, every call decided by fallback
            first = self.admit_failed(calls[0], e, t0, deadline)
            return [first, *(self._fallback(call, str(e), t0, e, deadline)
                             for call in calls[1:])]
        except Exception as e:  # defensive: a bug here must not drop the INVITEs
            return [self._fallback(call, f"admit: {e!r}", t0) for call in calls]
        return [self.admit_failed(call, r, t0, deadline) if isinstance(r, StoreError)
                else self.admit_reply(call, r, t0)
                for call, r in zip(calls, results, strict=True)]

    def admit_reply(self, call: Call, result: CallResult, t0: float) -> Decision:
        """The end of :meth:`admit` for a caller that sent the store's call itself (the
        decision service's pipelined admits): the store answered ``result``."""
        self._answered()
        d = _decision(result)
        self._decided(call, d, t0)
        g = d.egress
        if g is not None and not g.taken:
            self.log.info("egress_full", dialog_id=d.dialog_id, gateway=call.gateway,
                          code=g.code, limit=g.limit, count=g.count, max=g.max, kind=g.kind)
        return d

    def egress(self, dialog_id: str, gateway: str, deadline_ms: int | None = None
               ) -> EgressResult:
        """May an admitted call be sent to ``gateway`` (one call of the store's egress
        function)? Taken, the dialog holds the gateway (and no earlier attempt's); full,
        the proxy tries its next gateway. When the store fails, the policy's
        ``on_store_error`` decides (admit: the call goes, uncounted). Never raises."""
        if not self.breaker.allow():
            return self.egress_fallback(dialog_id, "circuit open: the store failed "
                                         "repeatedly")
        deadline = self.store.deadline_ms() if deadline_ms is None else deadline_ms
        try:
            r = self.store.egress(dialog_id, gateway, deadline)
        except StoreError as e:
            self._failed()
            self._store_error("egress", dialog_id, e)
            return self.egress_fallback(dialog_id, str(e))
        except Exception as e:  # defensive: a bug here must not drop the call
            return self.egress_fallback(dialog_id, f"egress: {e!r}")
        self._answered()
        if not r.taken:
            self.log.info("egress_full", dialog_id=dialog_id, gateway=gateway, code=r.code,
                          limit=r.limit, count=r.count, max=r.max, kind=r.kind)
        return r

    def egress_fallback(self, dialog_id: str, error: str) -> EgressResult:
        """What :meth:`egress` answers when the store does not: the policy's
        ``on_store_error`` (admit: the call goes, uncounted)."""
        policy = self._current.policy
        go = policy.on_store_error == "admit"
        rej = _OK if go else policy.reject
        return EgressResult(go, rej.code, rej.reason, rej.retry_after, None, 0, -1, "", (),
                            False, fallback=True, error=error)

    def admit_failed(self, call: Call, error: str | StoreError, t0: float,
                     deadline_ms: int | None = None) -> Decision:
        """The end of :meth:`admit` for such a caller when the store did not answer
        (``deadline_ms``: the one its request carried)."""
        self._failed()
        if self.metrics is not None:
            self.metrics.store_error("admit")
        cause = error if isinstance(error, StoreError) else None
        return self._fallback(call, str(error), t0, cause, deadline_ms)

    def _fallback(self, call: Call, error: str, t0: float, cause: StoreError | None = None,
                  deadline_ms: int | None = None) -> Decision:
        """The policy's ``on_store_error`` decides; emergency calls are always admitted.

        The decision stands, and the store learns it as soon as it answers: a call
        admitted here is recorded (once, as decided now: it counts until its early
        deadline from now, unless its release came first); a request that may still
        reach the store (it timed out: ``cause.maybe_applied``) is settled when this
        rejects the call, so that it never counts, whenever it arrives."""
        policy = self._current.policy
        c: Classification | None
        try:
            c = self._current.classifier.classify(call)
        except Exception:  # defensive: never let the fallback raise
            c = None
        emergency = c is not None and c.emergency
        admit = emergency or policy.on_store_error == "admit"
        rej = _OK if admit else policy.reject
        d = Decision(
            admitted=admit, code=rej.code, reason=rej.reason, retry_after=rej.retry_after,
            dialog_id=_safe_dialog_id(call), fallback=True,
            number_class=c.number_class if c else None,
            memberships=tuple(m.label() for m in c.members) if c else (),
            error=error, direction=c.direction if c else None,
        )
        if admit and d.dialog_id:
            # counted as soon as the store answers again, so counts are right afterwards
            self._queue(Op("record", d.dialog_id, self.store.deadline_ms(0), call=call,
                           node=self.node))
        elif d.dialog_id and deadline_ms is not None and cause is not None \
                and cause.maybe_applied:
            self._queue(Op("void", d.dialog_id, deadline_ms))
        self.log.error("store_error", call_id=call.call_id, dialog_id=d.dialog_id, error=error,
                       admitted=admit, on_store_error=policy.on_store_error, emergency=emergency)
        self._decided(call, d, t0)
        return d

    def _decided(self, call: Call, d: Decision, t0: float) -> None:
        elapsed = time.perf_counter() - t0
        if d.admitted and not (d.bypass or d.shadow or d.fallback):
            self.log.debug("decision", call_id=call.call_id, dialog_id=d.dialog_id,
                           admitted=True, number_class=d.number_class,
                           memberships=list(d.memberships), latency_us=round(elapsed * 1e6))
        else:
            # (a fraud rule's refusal counts nothing of a limit: its statistic and level
            # are in the rule's event; the limit names the rule)
            counted = {} if d.kind == "fraud" else {"count": d.count, "max": d.max}
            self.log.info("decision", call_id=call.call_id, dialog_id=d.dialog_id,
                          admitted=d.admitted, code=d.code, limit=d.limit, **counted,
                          kind=d.kind, bypass=d.bypass, shadow=d.shadow,
                          fallback=d.fallback,
                          number_class=d.number_class, memberships=list(d.memberships),
                          latency_us=round(elapsed * 1e6))
        if self.metrics is not None:
            self.metrics.decision(d, elapsed)

    # -- dialog events
    def confirm(self, dialog_id: str) -> bool:
        """The call was answered (2xx): it now counts until the dialog timeout."""
        return bool(self._event(Op("confirm", dialog_id,
                                   self._current.policy.timeouts.dialog_ms)))

    def refresh(self, dialog_id: str, timeout_s: int | None = None) -> bool:
        """Push a live dialog's deadline on (default: the policy's dialog timeout)."""
        ms = timeout_s * 1000 if timeout_s else self._current.policy.timeouts.dialog_ms
        return bool(self._event(Op("refresh", dialog_id, ms)))

    def release(self, dialog_id: str, reason: str = "bye") -> CallRecord | None:
        """The call ended; idempotent. Returns its call-end record the first time
        (None when it was not live, or when the store is down: then it is queued)."""
        rec = self._event(Op("release", dialog_id, reason))
        return rec if isinstance(rec, CallRecord) else None

    def apply_event(self, op: Op) -> object:
        """Apply one dialog event (confirm, refresh, release, set_var) at once, or queue
        it in order while the store does not answer (``policer serve``: the client learns
        which). The store's answer (True/False; for a release its call-end record, False
        when the dialog was not live), or None when it was queued."""
        return self._event(op)

    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        return bool(self._event(Op("set_var", dialog_id, name, value)))

    def get_var(self, dialog_id: str, name: str) -> str | None:
        try:
            return self.store.get_var(dialog_id, name)
        except StoreError as e:
            self._store_error("get_var", dialog_id, e)
            return None

    def apply_packed(self, packed: bytes) -> bool:
        """Apply dialog events a proxy queued, packed in the decision function's
        format (Kamailio's timer process). When the store fails they wait, in order,
        and go first once it answers: never dropped while the queue has room."""
        if not packed:
            return True
        return self._event(packed) is not None

    # -- a proxy's own queue of dialog events (Kamailio's mqueue)
    def pack(self, ops: Sequence[Op]) -> bytes:
        """Dialog events in the batch function's format: what a proxy queues, and applies
        with :meth:`apply_packed` or :meth:`apply_batch`."""
        return self.store.pack_ops(ops)

    def apply_batch(self, packed: bytes) -> int:
        """Apply a proxy's batch of packed dialog events now; how many it held. When the
        store does not take it, StoreError is raised (counted as a ``batch`` store error)
        and nothing is queued here: unlike :meth:`apply_packed`, the caller keeps the
        batch and sends it again."""
        try:
            return self.store.apply_packed(packed)
        except StoreError:
            if self.metrics is not None:
                self.metrics.store_error("batch")
            raise

    def hand_off(self, take: Callable[[bytes], object]) -> int:
        """Hand what this engine queued for the store (a call its fallback admitted, to be
        recorded), in order and each op packed, to ``take``: another process's queue,
        which applies it as soon as the store answers (Kamailio's timer), not at this
        process's next call. ``take`` raising stops the hand-off (and raises): what it did
        not take stays queued here. Returns how many were handed."""

        def move(items: list[Pending]) -> None:
            for item in items:
                take(item if isinstance(item, bytes) else self.store.pack_ops([item]))

        try:
            return self.pending.drain(move, len(self.pending), 1)
        finally:
            if self.metrics is not None:
                self.metrics.pending(len(self.pending), self.pending.dropped)

    @property
    def queued(self) -> int:
        """Operations waiting in this engine's queue for the store."""
        return len(self.pending)

    @property
    def dropped(self) -> int:
        """Operations this engine's queue dropped, full (oldest first)."""
        return self.pending.dropped

    @property
    def store_failing(self) -> bool:
        """The circuit breaker is open: decisions go to the fallback (one probe per
        interval)."""
        return self.breaker.open

    @property
    def clock_skew_ms(self) -> float:
        """This process's clock minus the store's (ms), as this node measured it."""
        return self.store.clock_skew_ms

    def probe(self) -> float | None:
        """Seconds one dry-run decision (the store's explain: it writes nothing) takes
        from here now (``policer_probe_seconds``); None while the circuit breaker is open.
        Raises StoreError."""
        if self.breaker.open:
            return None
        t0 = time.perf_counter()
        self.store.explain_call(_PROBE_CALL)
        return time.perf_counter() - t0

    def _event(self, item: Pending) -> object:
        """Apply a dialog event, or queue it (in order) while the store is down."""
        if self.pending and self.breaker.allow():
            self._drain(_DRAIN_BEFORE_EVENT)
        if self.pending or not self.breaker.allow():
            self._queue(item)
            return None
        try:
            result = self._apply([item])[0]
        except StoreError as e:
            self._failed()
            self._store_error(_kind(item), _did(item), e)
            self._queue(item)
            return None
        self._answered()
        return result

    def _apply(self, items: list[Pending]) -> list[object]:
        """Apply operations in order, ops in one store call per run (raises StoreError)."""
        out: list[object] = []
        ops: list[Op] = []

        def flush() -> None:
            if ops:
                for r in self.store.apply(ops, records=True):
                    if isinstance(r, CallRecord):
                        self.log.info("call_end", **r.as_dict())
                    out.append(r)
                ops.clear()

        for item in items:
            if isinstance(item, bytes):
                flush()
                out.append(self.store.apply_packed(item))
            else:
                ops.append(item)
                if len(ops) >= _BATCH:
                    flush()
        flush()
        return out

    def _queue(self, item: Pending) -> None:
        if not self.pending.push(item):
            self.log.warning("pending_dropped", op=_kind(item), dialog_id=_did(item),
                             maxlen=self.pending.maxlen, dropped=self.pending.dropped)
        if self.metrics is not None:
            self.metrics.pending(len(self.pending), self.pending.dropped)

    def _drain(self, limit: int) -> int:
        """Apply queued operations in order; stops at the first store error."""
        try:
            done = self.pending.drain(self._apply, limit, _BATCH)
        except StoreError as e:
            self._failed()
            self._store_error("drain", "", e)
            done = 0
        else:
            if done and self.breaker.open:
                self._recovered()
        if done and self.metrics is not None:
            self.metrics.pending(len(self.pending), self.pending.dropped)
        if done and not self.pending:
            self.log.info("pending_drained", applied=done)
        return done

    def _failed(self) -> None:
        if self.breaker.failure():
            self.log.error("circuit_open", threshold=self.breaker.threshold,
                           probe_every_s=self.breaker.probe_interval,
                           on_store_error=self._current.policy.on_store_error)
            if self.metrics is not None:
                self.metrics.breaker(True)

    def _answered(self) -> None:
        """The store answered: an open breaker closes."""
        if self.breaker.open:
            self._recovered()

    def _recovered(self) -> None:
        if self.breaker.success():
            self.log.info("circuit_closed", pending=len(self.pending))
            if self.metrics is not None:
                self.metrics.breaker(False)

    def _store_error(self, op: str, dialog_id: str, e: StoreError) -> None:
        if self.metrics is not None:
            self.metrics.store_error(op)
        self.log.error("store_error", op=op, dialog_id=dialog_id, error=str(e))

    # -- the node's life (policer.node)
    @property
    def dialog_source(self) -> Callable[[], Iterable[ProxyDialog]] | None:
        """The node's live calls (Kamailio's dlg.list), to put back when the store lost
        them (:meth:`resync`); None: this node cannot."""
        return self.lifecycle.dialog_source

    @dialog_source.setter
    def dialog_source(self, source: Callable[[], Iterable[ProxyDialog]] | None) -> None:
        self.lifecycle.dialog_source = source

    @property
    def instance(self) -> str:
        """This process's instance of the node (its lease's owner)."""
        return self.lifecycle.instance

    def start(self) -> None:
        """This node (proxy) starts afresh: end the dialogs it left behind in an
        earlier run (their process is gone; reason ``node_restarted``) and take its
        lease. Call once per proxy start, before its workers take calls.

        A node name has one live owner: when another live instance renews this node's
        lease, :class:`NodeInUse` is raised (pick another name: ``POLICER_NODE``). An
        instance that crashed renews no more: its node is taken over within one renew
        interval (and a tick). Never raises anything else; a store that does not answer
        is logged, and the tick takes the lease when it answers."""
        self.lifecycle.start()

    def tick(self) -> None:
        """Periodic duties, about once a second (Kamailio: from an rtimer route):
        measure the clock skew to the store and notice a store that lost its state
        (then put this node's live calls back), renew this node's lease and end dialogs
        of lost nodes, apply queued operations, reload the policy file if it changed.
        Never raises."""
        life = self.lifecycle
        try:
            self.poll_policy()
            # The tick asks the store whatever the breaker says (once a second, beside
            # the decisions, each call bounded by store_timeout), and its success closes
            # the breaker: a store that came back empty gets its library from here even
            # while the decisions' probes keep failing on the missing library (policer
            # serve's pipelined admits took every probe: 7.5 s of fallback decisions)
            if self.lease and not life.ensure_loaded():
                return
            if self.pending:
                self._drain(_DRAIN_PER_TICK)
            if self.lease:
                life.renew()
            if life.resync_due:
                self.resync()
        except Exception as e:  # a periodic duty must never take the timer process down
            self.log.error("tick_failed", error=repr(e))

    @property
    def resync_due(self) -> bool:
        """The store lost this node's calls and they are not back yet (:meth:`resync`)."""
        return self.lifecycle.resync_due

    def resync(self, dialogs: Iterable[ProxyDialog] | None = None) -> Report | None:
        """Put this node's live calls back into a store that lost them (and end what it
        counts for this node that the node no longer carries): what ``policer reconcile``
        does, with the node's own dialog list: ``dialogs``, else :attr:`dialog_source`
        (e.g. Kamailio's ``dlg.list``). Calls admitted while the list was taken are
        neither removed nor counted twice. Run by :meth:`tick` (and by ``policer serve``
        when its client sends the list); None when there is no list yet (a node whose
        client sends it: :attr:`resync_due` stays true until it does) or the store did
        not answer (tried again)."""
        return self.lifecycle.resync(dialogs)

    # -- inspection (may raise StoreError: these are for operators, not proxies)
    def explain(self, call: Call, at_ms: int | None = None) -> Explanation:
        """What ``admit`` would decide now, with every count, changing nothing: a dry
        run of the store's decision function (one atomic call). ``at_ms``: schedules and
        calendar windows as at that instant (Unix ms), counts of now."""
        r = self.store.explain_call(call, at_ms)
        number = call.attribute(self._current.policy.number_source)
        return Explanation(number, r.number_class, r.emergency, r.rows, _decision(r))

    def dialog(self, dialog_id: str) -> DialogInfo | None:
        return self.store.dialog(dialog_id)

    # -- for a caller that sends the store's admits itself (policer serve's pipeline):
    #    what admit() does before and instead of asking the store
    @property
    def circuit_open(self) -> bool:
        """The store failed repeatedly: calls go to the fallback but for a probe."""
        return self.breaker.open

    def store_allowed(self) -> bool:
        """May a call ask the store now (the circuit is closed, or this is its probe)?"""
        return self.breaker.allow()

    def fallback(self, call: Call, error: str, t0: float) -> Decision:
        """The policy's ``on_store_error`` decision for a call the store was not asked
        about (the circuit is open, or the failure that stopped it was counted), as
        :meth:`admit` decides then: admitted calls are recorded once the store answers."""
        return self._fallback(call, error, t0)

    def queue_event(self, op: Op) -> None:
        """Queue a dialog event without trying the store (its circuit is open): applied
        in order once it answers (the next event or :meth:`tick`)."""
        self._queue(op)


def _decision(r: CallResult) -> Decision:
    return Decision(
        admitted=r.admitted, code=r.code, reason=r.reason, retry_after=r.retry_after,
        dialog_id=r.dialog_id, limit=r.limit, count=r.count, max=r.max, bypass=r.bypass,
        shadow=r.shadow, duplicate=r.duplicate, number_class=r.number_class,
        memberships=r.memberships, kind=r.kind or None, window=r.window or None,
        max_duration=None if r.max_duration_ms is None else -(-r.max_duration_ms // 1000),
        direction=r.direction, egress=r.egress)


def _kind(item: Pending) -> str:
    return "batch" if isinstance(item, bytes) else item.kind


def _did(item: Pending) -> str:
    return "" if isinstance(item, bytes) else item.dialog_id


def _safe_dialog_id(call: Call) -> str:
    try:
        return dialog_id(call.call_id, call.from_tag)
    except Exception:
        return ""
