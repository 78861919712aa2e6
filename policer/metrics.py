"""Prometheus metrics.

Two kinds:

- **Worker metrics** (:class:`WorkerMetrics`), kept inside each process that
  decides calls (every Kamailio worker): decision latency, store errors,
  fallback decisions, policy reloads, the pending-operation queue. Kamailio
  runs many worker processes, so these use prometheus-client's multiprocess
  mode: set ``PROMETHEUS_MULTIPROC_DIR`` to a directory shared by the workers
  and the exporter (``deploy/kamailio/run`` does) *before* the process starts.
- **Cluster metrics** (:class:`ClusterCollector`), read from the store at
  scrape time, so one exporter serves the state of every proxy: profile
  counts, limits, utilisation, dialogs by state, decisions and ended dialogs
  counted inside the admission scripts.

Label cardinality is bounded: valued profiles get a series per value only for
the ``top`` busiest values and for values an operator lists. A value from SIP is a
label in the form :func:`policer.printable.printable` gives (a byte that is not
UTF-8 as ``\\xff``, a control character as ``\\x1b``, a backslash as ``\\\\``),
so that no caller can make a scrape fail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from policer.decision import Decision
from policer.log import get_logger
from policer.printable import printable
from policer.reload import PolicyWatcher
from policer.snapshot import take_snapshot
from policer.store import StoreError
from policer.store.base import END_REASONS
from policer.store.fraud import LEVELS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from policer.policy import Policy
    from policer.store.base import AdminStore

__all__ = [
    "DECISION_RESULTS",
    "LATENCY_BUCKETS",
    "ClusterCollector",
    "WorkerMetrics",
    "spread",
    "worker_metrics",
    "worker_registry",
]

#: Values of the ``result`` label of ``policer_decisions_total``.
DECISION_RESULTS = ("admitted", "rejected", "bypassed", "shadow_rejected", "store_error")

#: Upper bounds (s) of the ``policer_decision_seconds`` buckets (the native cfg counts
#: its decisions' latencies in the same buckets, see policer.adapters.kamailio_cfg).
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 1.0)


class WorkerMetrics:
    """Metrics a deciding process keeps (multiprocess-safe)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.decision_seconds = Histogram(
            "policer_decision_seconds", "Time to decide one INVITE, store round trip included.",
            ["result"], buckets=LATENCY_BUCKETS, registry=r)
        self.store_errors = Counter(
            "policer_store_errors", "Store calls that failed or passed their bound.", ["op"],
            registry=r)
        self.fallback = Counter(
            "policer_fallback_decisions", "Decisions taken by on_store_error.", ["admitted"],
            registry=r)
        self.reloads = Counter(
            "policer_policy_reloads", "Policy reloads by outcome.", ["result"], registry=r)
        self._dropped_seen = 0
        self.pending_ops = Gauge(
            "policer_pending_operations", "Store operations queued while the store is down.",
            multiprocess_mode="livesum", registry=r)
        self.pending_dropped = Counter(
            "policer_pending_dropped", "Queued operations dropped because the queue was full.",
            registry=r)
        self.breaker_open = Gauge(
            "policer_circuit_open", "1 while the circuit breaker short-cuts to the fallback.",
            multiprocess_mode="livemax", registry=r)
        self.probe_seconds = Histogram(
            "policer_probe_seconds", "A dry run of the decision function (explain), timed "
            "once a tick by a proxy's timer process: store round trip and the function's "
            "work, no SIP worker involved.", buckets=LATENCY_BUCKETS, registry=r)

    def decision(self, d: Decision, seconds: float) -> None:
        if d.fallback:
            result = "store_error"
            self.fallback.labels("true" if d.admitted else "false").inc()
        elif not d.admitted:
            result = "rejected"
        elif d.bypass:
            result = "bypassed"
        elif d.shadow:
            result = "shadow_rejected"
        else:
            result = "admitted"
        self.decision_seconds.labels(result).observe(seconds)

    def observed(self, result: str, buckets: list[int], seconds: float) -> None:
        """Decisions another process measured (the native cfg's SIP workers count them
        per bucket of :data:`LATENCY_BUCKETS`, the last entry being +Inf): add them to
        ``policer_decision_seconds`` with their latency sum, through the public
        ``observe`` (one per decision, each at a value inside its bucket: the bucket
        counts are exact and so is the sum whenever it fits the buckets)."""
        child = self.decision_seconds.labels(result)
        for value, n in spread(buckets, seconds):
            for _ in range(n):
                child.observe(value)

    def probe(self, seconds: float) -> None:
        self.probe_seconds.observe(seconds)

    def fallbacks(self, admitted: bool, n: int = 1) -> None:
        """Decisions another process took by on_store_error (the native cfg)."""
        if n > 0:
            self.fallback.labels("true" if admitted else "false").inc(n)

    def store_error(self, op: str, n: int = 1) -> None:
        if n > 0:
            self.store_errors.labels(op).inc(n)

    def pending(self, queued: int, dropped: int) -> None:
        self.pending_ops.set(queued)
        grown = dropped - self._dropped_seen
        if grown > 0:
            self.pending_dropped.inc(grown)
            self._dropped_seen = dropped

    def breaker(self, is_open: bool) -> None:
        self.breaker_open.set(1 if is_open else 0)

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()


def spread(buckets: list[int], seconds: float) -> list[tuple[float, int]]:
    """(value, how many) per non-empty bucket of :data:`LATENCY_BUCKETS` (+Inf last)
    such that every value lies in its bucket and, when the buckets allow it, the
    values add up to ``seconds``."""
    bounds = (*LATENCY_BUCKETS, float("inf"))
    lows = (0.0, *LATENCY_BUCKETS)
    filled = [(lo, hi, n) for lo, hi, n in zip(lows, bounds, buckets, strict=False) if n > 0]
    finite = [(lo, hi, n) for lo, hi, n in filled if hi != float("inf")]
    inf = [(lo, n) for lo, hi, n in filled if hi == float("inf")]
    out: list[tuple[float, int]] = []
    if inf:  # the finite ones at their middle, the rest of the sum over the +Inf ones
        out = [((lo + hi) / 2, n) for lo, hi, n in finite]
        lo, n = inf[0]
        rest = seconds - sum(v * k for v, k in out)
        out.append((max(rest / n, lo * 1.000001), n))
        return out
    base = sum(lo * n for lo, _, n in finite)
    span = sum((hi - lo) * n for lo, hi, n in finite)
    t = min(1.0, max(1e-6, (seconds - base) / span)) if span > 0 else 1.0
    return [(lo + t * (hi - lo), n) for lo, hi, n in finite]


_worker: WorkerMetrics | None = None


def worker_metrics() -> WorkerMetrics:
    """This process's worker metrics (created once, in the default registry)."""
    global _worker
    if _worker is None:
        _worker = WorkerMetrics()
    return _worker


def worker_registry() -> CollectorRegistry:
    """A registry that reads every worker's metrics from ``PROMETHEUS_MULTIPROC_DIR``."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


class ClusterCollector(Collector):
    """Cluster-wide state read from the store at every scrape."""

    def __init__(self, policy: Policy, store: AdminStore, top: int = 10,
                 listed: Mapping[str, Iterable[str]] | None = None) -> None:
        self.policy = policy
        self.store = store
        self.top = top
        self.listed = {k: list(v) for k, v in (listed or {}).items()}
        self.log = get_logger("policer.exporter")
        self._near: set[tuple[str, str]] = set()
        self._last_event: str | None = None  # the last fraud event logged
        self._watcher: PolicyWatcher | None = None

    def watch(self, path: str, interval: float = 1.0) -> None:
        """Read the policy file again when it changes (checked at each scrape, at most
        once per ``interval`` seconds): a new profile or fraud rule gets its series
        without a restart. Another namespace is refused (the exporter reads one
        namespace's keys); a broken file is logged and the last good policy kept."""
        self._watcher = PolicyWatcher(path, self._use, interval=interval,
                                      files=self.policy.files, wait=5.0)

    def _use(self, policy: Policy) -> None:
        if policy.namespace != self.policy.namespace:
            raise ValueError(f"the policy's namespace changed ({self.policy.namespace} -> "
                             f"{policy.namespace}): restart the exporter")
        self.policy = policy

    def _fraud(self) -> Iterator[Metric]:
        """The fraud guard: events per rule, level and statistic (every one the policy
        can raise, from 0: a first event is an increase), the values blocked now per
        rule; each new event is logged once by this exporter (fraud_event)."""
        store, policy = self.store, self.policy
        events = CounterMetricFamily(
            "policer_fraud_events", "Fraud events: a statistic that reached a level "
            "(cluster-wide, once per value and window).", labels=["rule", "level", "stat"])
        counts = store.fraud_counts()
        for rule in policy.fraud:
            for stat in rule.stats:
                for level in LEVELS:
                    events.add_metric([rule.name, level, stat],
                                      counts.get((rule.name, level, stat), 0))
        yield events
        blocked = GaugeMetricFamily("policer_fraud_blocked", "Values a fraud rule blocks now.",
                                    labels=["rule"])
        now_blocked = store.fraud_blocks()
        for rule in policy.fraud:
            blocked.add_metric([rule.name], sum(1 for b in now_blocked if b.rule == rule.name))
        yield blocked
        if self._last_event is None:  # at start: only what comes next is logged
            last = store.fraud_events(count=1)
            self._last_event = last[-1].id if last else "0-0"
        for e in store.fraud_events(count=1000, after=self._last_event):
            self._last_event = e.id
            log = self.log.warning if e.level == "critical" else self.log.info
            log("fraud_event", **{k: v for k, v in e.as_dict().items() if k != "id"})

    def collect(self) -> Iterator[Metric]:
        if self._watcher is not None:
            self._watcher.poll()
        policy = self.policy
        up = GaugeMetricFamily("policer_store_up", "1 when the store answered this scrape.")
        t0 = time.perf_counter()
        try:
            snap = take_snapshot(policy, self.store, self.top, self.listed)
        except StoreError as e:
            self.log.error("scrape_failed", error=str(e))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        labels = ["profile", "value"]
        dialogs = GaugeMetricFamily("policer_profile_dialogs",
                                    "Live dialogs per profile (valued: per listed/top value, "
                                    "value=\"\" is the sum over all values).", labels=labels)
        limit = GaugeMetricFamily("policer_profile_limit",
                                  "The max of a profile (valued: of that value, live limits "
                                  "applied).", labels=labels)
        util = GaugeMetricFamily("policer_profile_utilization",
                                 "Live dialogs / limit.", labels=labels)
        near = GaugeMetricFamily("policer_profile_near_limit",
                                 f"1 when utilisation >= near_limit ({policy.near_limit_ratio}).",
                                 labels=labels)
        rate_usage = GaugeMetricFamily(
            "policer_profile_rate_usage", "Calls owed to a profile's rate over its burst "
            "(GCRA; 1 = the next call is rejected, above 1 only after emergency bypass).",
            labels=labels)
        calls = GaugeMetricFamily("policer_profile_calls",
                                  "New calls in the current calendar window.",
                                  labels=[*labels, "window"])
        calls_limit = GaugeMetricFamily("policer_profile_calls_limit",
                                        "The cap of a calendar window.",
                                        labels=[*labels, "window"])
        for row in (*snap.rows, *snap.values):
            key = [row.profile, printable(row.value or "")]
            dialogs.add_metric(key, row.count)
            if row.rate_usage is not None:
                rate_usage.add_metric(key, row.rate_usage)
            for per, n in row.calls.items():
                calls.add_metric([*key, per], n)
                if per in row.calls_max:
                    calls_limit.add_metric([*key, per], row.calls_max[per])
            u = row.utilization
            if row.limit is None or u is None:
                continue
            limit.add_metric(key, row.limit)
            util.add_metric(key, u)
            is_near = u >= policy.near_limit_ratio
            near.add_metric(key, 1 if is_near else 0)
            tag = (row.profile, key[1])
            if is_near and tag not in self._near:
                self._near.add(tag)
                self.log.warning("near_limit", profile=row.profile, value=row.value,
                                 count=row.count, limit=row.limit, utilization=round(u, 3))
            elif not is_near and tag in self._near:
                self._near.discard(tag)
                self.log.info("below_near_limit", profile=row.profile, value=row.value,
                              count=row.count, limit=row.limit)
        yield from (dialogs, limit, util, near, rate_usage, calls, calls_limit)

        states = GaugeMetricFamily("policer_dialogs", "Live dialogs by state.", labels=["state"])
        states.add_metric(["early"], snap.stats.get("early", 0))
        states.add_metric(["confirmed"], snap.stats.get("confirmed", 0))
        yield states

        decisions = CounterMetricFamily("policer_decisions", "Admission decisions, counted inside "
                                        "the admission scripts (cluster-wide).",
                                        labels=["result", "profile"])
        seen = set()
        for (result, profile), n in sorted(snap.decisions.items()):
            decisions.add_metric([result, printable(profile)], n)
            seen.add((result, profile))
        for p in policy.profiles:
            for result in DECISION_RESULTS:
                if (result, p.name) not in seen:
                    decisions.add_metric([result, p.name], 0)
        yield decisions

        ended = CounterMetricFamily("policer_dialogs_ended", "Dialogs ended, by reason.",
                                    labels=["reason"])
        for reason in sorted(set(END_REASONS) | set(snap.ended)):
            ended.add_metric([reason], snap.ended.get(reason, 0))
        yield ended

        for name in ("processed", "rejected", "failed", "expired"):
            c = CounterMetricFamily(f"policer_dialogs_{name}", f"Dialogs {name} (kamcmd "
                                    f"{name}_dialogs).")
            c.add_metric([], snap.stats.get(name, 0))
            yield c
        info = GaugeMetricFamily("policer_policy_info", "The policy the store decides by "
                                 "(hash of its function library; hash=\"\" when the store "
                                 "has none loaded) and the one this exporter read from its file.",
                                 labels=["namespace", "hash", "file_hash"])
        info.add_metric([policy.namespace, snap.policy_hash or "", snap.policy_file_hash], 1)
        yield info
        skew = GaugeMetricFamily("policer_node_clock_skew_seconds",
                                 "A node's clock minus Redis's, as the node measured it "
                                 "(nodes holding a lease); decisions stay right whatever it "
                                 "is, beyond 0.5 s the node logs clock_skew.",
                                 labels=["node"])
        for node, ms in sorted(snap.skews.items()):
            skew.add_metric([printable(node)], ms / 1000)
        yield skew
        if policy.fraud:
            yield from self._fraud()
        took = GaugeMetricFamily("policer_scrape_seconds", "Time to read the store.")
        took.add_metric([], time.perf_counter() - t0)
        yield took
