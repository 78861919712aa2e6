"""The engine: the one API adapters call (Kamailio, the command line, the
simulation). It classifies a call with the policy, asks the store in one atomic
operation, and turns the answer into a :class:`Decision`.

The engine never raises at the proxy: when the store fails or is too slow, the
policy's ``on_store_error`` decides (emergency calls are always admitted) and
the decision says it came from that fallback.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from policer.call import Call
from policer.classify import Classification, Classifier
from policer.log import get_logger
from policer.policy import Policy, Reject, load_policy
from policer.reload import PolicyWatcher
from policer.resilience import CircuitBreaker, Pending, PendingQueue
from policer.store import Store, StoreError, open_store
from policer.store.base import AdmitRequest, CallRecord, DialogInfo

__all__ = ["Decision", "Engine", "EngineMetrics", "Explanation", "LimitView"]

_OK = Reject(code=200, reason="OK", retry_after=None)
#: Queued operations applied before an admit (the rest wait for later calls or tick()).
_DRAIN_BEFORE_ADMIT = 200
_DRAIN_PER_TICK = 5_000
#: The most dialogs a store's renew ends in one call (the Redis store's RENEW_BATCH).
_RENEW_BATCH = 200


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one INVITE."""

    admitted: bool
    code: int
    reason: str
    retry_after: int | None
    dialog_id: str
    limit: str | None = None  # the profile whose limit tripped (or was bypassed / shadowed)
    count: int = 0
    max: int = -1
    bypass: bool = False  # an emergency call admitted over a limit
    shadow: bool = False  # a shadow limit would have rejected this admitted call
    duplicate: bool = False  # the dialog was decided before; this is that decision
    fallback: bool = False  # the store failed: on_store_error decided
    number_class: str | None = None
    memberships: tuple[str, ...] = ()
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "admitted": self.admitted,
            "code": self.code,
            "reason": self.reason,
            "retry_after": self.retry_after,
            "limit": self.limit,
            "count": self.count,
            "max": self.max,
            "bypass": self.bypass,
            "shadow": self.shadow,
            "duplicate": self.duplicate,
            "fallback": self.fallback,
            "dialog_id": self.dialog_id,
            "class": self.number_class,
            "memberships": list(self.memberships),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class LimitView:
    """One membership as ``policer explain`` shows it."""

    profile: str
    value: str | None
    count: int
    max: int  # -1 when the profile is only counted
    effective_max: int  # what an ordinary call may reach (max - reserve), emergency: max
    live_limit: bool  # max comes from a live limit set at run time
    shadow: bool
    would_trip: bool


@dataclass(frozen=True, slots=True)
class Explanation:
    number: str
    number_class: str | None
    emergency: bool
    limits: tuple[LimitView, ...]
    decision: Decision

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "class": self.number_class,
            "emergency": self.emergency,
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
                }
                for v in self.limits
            ],
            "decision": self.decision.as_dict(),
        }


class EngineMetrics(Protocol):
    """What the engine reports to (``policer.metrics.WorkerMetrics`` implements it)."""

    def decision(self, d: Decision, seconds: float) -> None: ...

    def store_error(self, op: str) -> None: ...

    def pending(self, queued: int, dropped: int) -> None: ...

    def breaker(self, is_open: bool) -> None: ...

    def reload(self, result: str) -> None: ...


@dataclass(slots=True)
class _Current:
    """The policy in force and what is derived from it (swapped whole on reload)."""

    policy: Policy
    classifier: Classifier


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
        self.node = node or os.environ.get("POLICER_NODE") or socket.gethostname()
        self.log = get_logger("policer.engine").bind(node=self.node)
        self.metrics = metrics
        self.lease = lease
        self.breaker = CircuitBreaker()
        self.pending = PendingQueue(policy.pending_queue)
        self._watcher = (PolicyWatcher(watch, self.reload, watch_interval,
                                       on_result=self._reload_result)
                         if watch is not None else None)
        self._next_renew = 0.0

    # -- construction
    @classmethod
    def from_env(cls, policy_path: str | None = None, redis_url: str | None = None,
                 lease: bool = True) -> Engine:
        """A proxy node's engine from ``POLICER_POLICY``, ``POLICER_REDIS_URL`` and
        ``POLICER_NODE``: it holds a node lease and reloads the policy file on change."""
        path = policy_path or os.environ.get("POLICER_POLICY") or "policies/example.yaml"
        policy = load_policy(path)
        url = redis_url or os.environ.get("POLICER_REDIS_URL") or "redis://127.0.0.1:6379/0"
        store = open_store(url, policy.namespace, timeout_ms=policy.store_timeout_ms)
        from policer.metrics import worker_metrics

        return cls(policy, store, metrics=worker_metrics(), lease=lease, watch=path)

    @property
    def policy(self) -> Policy:
        return self._current.policy

    def reload(self, policy: Policy) -> None:
        """Swap in a new, already validated policy; the next INVITE uses it."""
        if policy.namespace != self.store.namespace:
            raise ValueError(
                f"the new policy's namespace {policy.namespace!r} differs from the store's "
                f"{self.store.namespace!r}; restart to change namespaces"
            )
        self._current = _Current(policy, Classifier(policy))
        self.pending.maxlen = policy.pending_queue
        self.log.info("policy_reloaded", source=policy.source)

    def _reload_result(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reload(result)

    def classify(self, call: Call) -> Classification:
        return self._current.classifier.classify(call)

    # -- the hot path
    def admit(self, call: Call) -> Decision:
        """Decide one initial INVITE. Never raises."""
        t0 = time.perf_counter()
        if self._watcher is not None:
            self._watcher.poll()
        current = self._current
        policy = current.policy
        try:
            c = current.classifier.classify(call)
            did = call.dialog_id
        except Exception as e:  # defensive: a bug here must not drop the INVITE
            return self._fallback(call, None, f"classify: {e!r}", t0)
        request = self._request(call, did, c, policy, self.node)
        if not self.breaker.allow():
            return self._fallback(call, c, "circuit open: the store failed repeatedly", t0,
                                  request)
        if self.pending:  # what happened while the store was down goes first
            self._drain(_DRAIN_BEFORE_ADMIT)
        try:
            r = self.store.admit(request)
        except StoreError as e:
            self._failed()
            if self.metrics is not None:
                self.metrics.store_error("admit")
            return self._fallback(call, c, str(e), t0, request)
        if self.breaker.open:
            self._recovered()
        labels = tuple(m.label() for m in c.members)
        if r.admitted:
            limit = r.tripped if r.tripped >= 0 else r.shadow
            d = Decision(
                admitted=True, code=200, reason="OK", retry_after=None, dialog_id=did,
                limit=c.members[limit].profile if limit >= 0 else None,
                count=r.count, max=r.max, bypass=r.bypass, shadow=r.shadow >= 0,
                duplicate=r.duplicate, number_class=c.number_class, memberships=labels,
            )
        else:
            m = c.members[r.tripped]
            lim = policy.limits.get(m.profile)
            rej = lim.reject if lim is not None else policy.reject
            d = Decision(
                admitted=False, code=rej.code, reason=rej.reason, retry_after=rej.retry_after,
                dialog_id=did, limit=m.profile, count=r.count, max=r.max,
                duplicate=r.duplicate, number_class=c.number_class, memberships=labels,
            )
        self._decided(call, d, t0)
        return d

    def _request(self, call: Call, did: str, c: Classification, policy: Policy, node: str,
                 record: bool = False) -> AdmitRequest:
        return AdmitRequest(
            dialog_id=did,
            members=c.members,
            early_ms=policy.timeouts.early_ms,
            emergency=c.emergency,
            emergency_bypass=c.emergency and policy.emergency_bypass,
            info={
                "call_id": call.call_id,
                "from": f"{call.from_user}@{call.from_domain}",
                "to": c.number,
                "class": c.number_class or "",
                "node": node,
                "source_ip": call.source_ip,
            },
            node=node,
            lease_ms=policy.nodes.lease_ms if self.lease and node == self.node else 0,
            sweep_nodes=self.lease and policy.nodes.on_node_loss == "release",
            record=record,
        )

    def restore(self, call: Call, node: str, confirmed: bool) -> bool:
        """Count a call a proxy still carries but the store lost (``policer
        reconcile``): it joins its profiles without a limit check, as admitted by
        ``node``. Returns False when the store already had it. Raises StoreError."""
        policy = self._current.policy
        c = self._current.classifier.classify(call)
        r = self.store.admit(self._request(call, call.dialog_id, c, policy, node, record=True))
        if confirmed:
            self.store.confirm(call.dialog_id, policy.timeouts.dialog_ms)
        return not r.duplicate

    def _fallback(self, call: Call, c: Classification | None, error: str, t0: float,
                  request: AdmitRequest | None = None) -> Decision:
        policy = self._current.policy
        emergency = c is not None and c.emergency
        admit = emergency or policy.on_store_error == "admit"
        rej = _OK if admit else policy.reject
        d = Decision(
            admitted=admit, code=rej.code, reason=rej.reason, retry_after=rej.retry_after,
            dialog_id=_safe_dialog_id(call), fallback=True,
            number_class=c.number_class if c else None,
            memberships=tuple(m.label() for m in c.members) if c else (),
            error=error,
        )
        if admit and request is not None:
            # counted as soon as the store answers again, so counts are right afterwards
            self._queue("record", request.dialog_id, replace(request, record=True))
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
            self.log.info("decision", call_id=call.call_id, dialog_id=d.dialog_id,
                          admitted=d.admitted, code=d.code, limit=d.limit, count=d.count,
                          max=d.max, bypass=d.bypass, shadow=d.shadow, fallback=d.fallback,
                          number_class=d.number_class, memberships=list(d.memberships),
                          latency_us=round(elapsed * 1e6))
        if self.metrics is not None:
            self.metrics.decision(d, elapsed)

    # -- dialog events
    def confirm(self, dialog_id: str) -> bool:
        """The call was answered (2xx): it now counts until the dialog timeout."""
        return bool(self._event("confirm", dialog_id, self._current.policy.timeouts.dialog_ms))

    def refresh(self, dialog_id: str, timeout_s: int | None = None) -> bool:
        """Push a live dialog's deadline on (default: the policy's dialog timeout)."""
        ms = timeout_s * 1000 if timeout_s else self._current.policy.timeouts.dialog_ms
        return bool(self._event("refresh", dialog_id, ms))

    def release(self, dialog_id: str, reason: str = "bye") -> CallRecord | None:
        """The call ended; idempotent. Returns its call-end record the first time
        (None when it was not live, or when the store is down: then it is queued)."""
        rec = self._event("release", dialog_id, reason)
        return rec if isinstance(rec, CallRecord) else None

    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        return bool(self._event("set_var", dialog_id, name, value))

    def get_var(self, dialog_id: str, name: str) -> str | None:
        try:
            return self.store.get_var(dialog_id, name)
        except StoreError as e:
            self._store_error("get_var", dialog_id, e)
            return None

    def _event(self, op: str, dialog_id: str, *args: Any) -> object:
        """Apply a dialog event, or queue it (in order) while the store is down."""
        if self.pending:
            self._drain(_DRAIN_BEFORE_ADMIT)
        if self.pending or not self.breaker.allow():
            self._queue(op, dialog_id, *args)
            return None
        try:
            result = self._apply(Pending(op, dialog_id, args, 0.0))
        except StoreError as e:
            self._failed()
            self._store_error(op, dialog_id, e)
            self._queue(op, dialog_id, *args)
            return None
        if self.breaker.open:
            self._recovered()
        return result

    def _apply(self, item: Pending) -> object:
        """Run one store operation (raises StoreError)."""
        store, did, args = self.store, item.dialog_id, item.args
        if item.op == "record":
            return store.admit(args[0])
        if item.op == "confirm":
            return store.confirm(did, args[0])
        if item.op == "refresh":
            return store.refresh(did, args[0])
        if item.op == "set_var":
            return store.set_var(did, args[0], args[1])
        rec = store.release(did, args[0])
        if rec is not None:
            self.log.info("call_end", **rec.as_dict())
        return rec

    def _queue(self, op: str, dialog_id: str, *args: Any) -> None:
        if not self.pending.push(op, dialog_id, *args):
            self.log.warning("pending_dropped", op=op, dialog_id=dialog_id,
                             maxlen=self.pending.maxlen, dropped=self.pending.dropped)
        if self.metrics is not None:
            self.metrics.pending(len(self.pending), self.pending.dropped)

    def _drain(self, limit: int) -> int:
        """Apply queued operations in order; stops at the first store error."""
        try:
            done = self.pending.drain(self._apply, limit)
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

    def _recovered(self) -> None:
        if self.breaker.success():
            self.log.info("circuit_closed", pending=len(self.pending))
            if self.metrics is not None:
                self.metrics.breaker(False)

    def _store_error(self, op: str, dialog_id: str, e: StoreError) -> None:
        if self.metrics is not None:
            self.metrics.store_error(op)
        self.log.error("store_error", op=op, dialog_id=dialog_id, error=str(e))

    # -- the node's life
    def start(self) -> None:
        """This node (proxy) starts afresh: end the dialogs it left behind in an
        earlier run (their process is gone; reason ``node_restarted``) and take its
        lease. Call once per proxy start, before its workers take calls. Never raises."""
        nodes = self._current.policy.nodes
        try:
            for _ in range(100_000):  # each round ends a bounded batch
                _, left = self.store.renew(self.node, nodes.lease_ms,
                                           nodes.on_node_loss == "release", start=True)
                if left == 0:
                    break
        except StoreError as e:
            self._store_error("start", "", e)
            return
        self._next_renew = time.monotonic() + nodes.renew_ms / 1000
        self.log.info("node_started", lease_ms=nodes.lease_ms, renew_ms=nodes.renew_ms)

    def tick(self) -> None:
        """Periodic duties, about once a second (Kamailio: from an rtimer route):
        renew this node's lease and end dialogs of lost nodes, apply queued
        operations, reload the policy file if it changed. Never raises."""
        try:
            if self._watcher is not None:
                self._watcher.poll()
            if self.pending and self.breaker.allow():
                self._drain(_DRAIN_PER_TICK)
            now = time.monotonic()
            if self.lease and now >= self._next_renew:
                nodes = self._current.policy.nodes
                self._next_renew = now + nodes.renew_ms / 1000
                swept = 0
                try:
                    for _ in range(50):  # each script ends a bounded batch
                        n, _ = self.store.renew(self.node, nodes.lease_ms,
                                                nodes.on_node_loss == "release")
                        swept += n
                        if n < _RENEW_BATCH:
                            break
                except StoreError as e:
                    self._failed()
                    self._store_error("renew", "", e)
                if swept:
                    self.log.warning("lost_node_dialogs_ended", count=swept)
        except Exception as e:  # a periodic duty must never take the timer process down
            self.log.error("tick_failed", error=repr(e))

    # -- inspection (may raise StoreError: these are for operators, not proxies)
    def explain(self, call: Call) -> Explanation:
        """What ``admit`` would decide now, with every count, changing nothing."""
        policy = self._current.policy
        c = self.classify(call)
        views: list[LimitView] = []
        tripped: LimitView | None = None
        bypass = c.emergency and policy.emergency_bypass
        for m in c.members:
            count = self.store.profile_size(m.profile, m.value)
            mx, live = m.max, False
            if m.value is not None:
                override = self.store.limit_get(m.profile, m.value)
                if override is not None:
                    mx, live = override, True
            effective = mx if c.emergency else mx - m.reserve
            trips = mx >= 0 and count >= effective
            v = LimitView(m.profile, m.value, count, mx, effective, live, m.shadow, trips)
            views.append(v)
            if trips and not m.shadow and tripped is None:
                tripped = v
        did = call.dialog_id
        labels = tuple(m.label() for m in c.members)
        if tripped is None or bypass:
            d = Decision(True, 200, "OK", None, did, bypass=tripped is not None,
                         limit=tripped.profile if tripped else None,
                         number_class=c.number_class, memberships=labels)
        else:
            lim = policy.limits.get(tripped.profile)
            rej = lim.reject if lim else policy.reject
            d = Decision(False, rej.code, rej.reason, rej.retry_after, did, limit=tripped.profile,
                         count=tripped.count, max=tripped.effective_max,
                         number_class=c.number_class, memberships=labels)
        return Explanation(c.number, c.number_class, c.emergency, tuple(views), d)

    def dialog(self, dialog_id: str) -> DialogInfo | None:
        return self.store.dialog(dialog_id)


def _safe_dialog_id(call: Call) -> str:
    try:
        return call.dialog_id
    except Exception:
        return ""
