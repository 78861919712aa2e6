"""The native flavour's Python side (``deploy/kamailio/policer.cfg``): the cfg decides
every INVITE itself, one ``FCALL`` of the policy's admit function through
``ndb_redis``, and queues dialog events in Kamailio's ``mqueue``, applied by a cfg
``rtimer`` route in batches (see :mod:`policer.adapters.kamailio_cfg`). No SIP worker
runs Python. Python lives in Kamailio's timer process only: :func:`start_native` in
``mod_init`` (before the fork) and :class:`NativeHandler` ``tick`` once a second
(:class:`NativeTimer`: the engine's tick, the policy file, the htables the cfg's
fallback reads, metrics).
"""

from __future__ import annotations

import os

from policer.adapters.kamailio_engine import (
    engine,
    factory_is_default,
    forget,
    probe,
    set_engine_factory,
)
from policer.adapters.kamailio_ksr import OK, ksr, log, log_exception, proxy_dialogs
from policer.adapters.kamailio_queue import QUEUE
from policer.compile import attribute_sources
from policer.engine import Engine, NodeInUse, Prepared
from policer.policy import Policy
from policer.reload import PolicyWatcher

__all__ = ["NativeHandler", "NativeTimer", "emergency_entries", "fallback_tables",
           "native_engine", "native_timer", "start_native"]


def native_engine() -> Engine:
    """The native flavour's engine: like :meth:`Engine.from_env`, but the policy file is
    watched by :class:`NativeTimer` (a reload must keep the attributes the generated
    cfg packs)."""
    return Engine.from_env(watch=False)


#: htables the native cfg's fallback reads (defined in policer.cfg)
_SETTINGS = "policer"
_CLASSES = "policer_class"
#: values in policer_class: the number (exact n:, prefix p:) or default is of the
#: emergency class (1) or of another class (2); absent: no class
_EMERGENCY, _OTHER = 1, 2


def fallback_tables(policy: Policy) -> dict[str, dict[str, int | str]]:
    """What the native cfg needs to decide without Redis, as htable contents: the
    policy's ``on_store_error`` and reject answer, and what of its classification tells
    emergency numbers from the rest with the same rule as the function (exact number,
    else longest prefix, else the default class; route POLICER_EMERGENCY).

    Only the entries that rule needs are written, each marked emergency (1) or not (2):
    an entry that gives the same answer as the entry (or default) it would fall through
    to is left out. A class of a million premium-rate prefixes beside an emergency class
    of exact numbers is then no entry at all, instead of a million htable writes by the
    timer process at every reload; the answer is the same for every number."""
    settings: dict[str, int | str] = {
        "ready": 1,
        "admit_on_error": 1 if policy.on_store_error == "admit" else 0,
        "reject_code": policy.reject.code,
        "reject_reason": policy.reject.reason,
        "reject_retry": -1 if policy.reject.retry_after is None else policy.reject.retry_after,
    }
    classes: dict[str, int | str] = {}
    emergency = policy.emergency_class
    if emergency is not None:
        classes["enabled"] = 1
        numbers, prefixes, default = emergency_entries(policy)
        for n, mark in numbers.items():
            classes[f"n:{n}"] = mark
        for p, mark in prefixes.items():
            classes[f"p:{p}"] = mark
        if default is not None:
            classes["default"] = default
        # the cfg tries prefix lengths in a while loop: within the core's max_while_loops
        classes["maxlen"] = min(max(map(len, prefixes), default=0), 100)
    return {_SETTINGS: settings, _CLASSES: classes}


def emergency_entries(policy: Policy) -> tuple[dict[str, int], dict[str, int], int | None]:
    """The exact numbers and prefixes (each marked :data:`_EMERGENCY` or :data:`_OTHER`)
    and the default class's mark that tell emergency numbers from the rest as the
    policy's classification does, without the entries that would not change an answer.

    With D the default's answer (no default: not emergency), a prefix is needed when
    its answer differs from that of its nearest shorter prefix in the policy (or D),
    and an exact number when its answer differs from that of its longest prefix (or
    D). Only entries whose answer is not D ("exceptions", usually a few emergency
    prefixes) can make another entry needed, so an entry is first looked up under the
    lengths of the exceptions alone: linear in the policy, a few lookups per entry."""
    emergency = policy.emergency_class
    mark: dict[str, int] = {}  # class name -> mark
    default: int | None = None
    prefix_mark: dict[str, int] = {}
    number_mark: dict[str, int] = {}
    for c in policy.classes:
        m = _EMERGENCY if c.name == emergency else _OTHER
        mark[c.name] = m
        prefix_mark.update(dict.fromkeys(c.prefixes, m))
        number_mark.update(dict.fromkeys(c.numbers, m))
        if c.default:
            default = m
    base = default if default is not None else _OTHER  # a number of no class: not one
    exceptions = {p for p, m in prefix_mark.items() if m != base}
    exception_lengths = sorted(set(map(len, exceptions)), reverse=True)
    all_lengths = sorted(set(map(len, prefix_mark)), reverse=True)

    def inherited(text: str, longest: int) -> int:
        """The answer of the longest prefix of ``text`` no longer than ``longest``."""
        if not any(text[:n] in exceptions for n in exception_lengths if n <= longest):
            return base  # every prefix on the way answers as the default does
        for n in all_lengths:
            if n <= longest:
                found = prefix_mark.get(text[:n])
                if found is not None:
                    return found
        return base

    if not exceptions:  # the usual case: every prefix answers as the default does
        return {n: m for n, m in number_mark.items() if m != base}, {}, default
    prefixes = {p: m for p, m in prefix_mark.items() if m != inherited(p, len(p) - 1)}
    numbers = {n: m for n, m in number_mark.items() if m != inherited(n, len(n))}
    return numbers, prefixes, default


class NativeTimer:
    """The native flavour's Python side, in Kamailio's timer process (once a second)
    and in ``mod_init``: never on a SIP worker's path.

    * the engine: :meth:`Engine.start` before the fork, :meth:`Engine.tick` (lease,
      lost-node and expiry sweeps, the library back within a second when Redis lost it);
    * the policy file (and its lists): a changed, valid policy is read, compiled and
      loaded into Redis in the background, and swapped in by a later tick (which
      renews the lease meanwhile), unless it changes the call attributes the generated
      cfg packs, which needs a restart (refused and logged, the old policy keeps
      deciding);
    * the htables the cfg's fallback reads (:func:`fallback_tables`);
    * metrics: the decisions the cfg counted (latency buckets measured by the SIP
      workers around their ``FCALL``, results, store errors, fallbacks, the event
      queue) into the ``policer_*`` metrics, and a probe: one dry-run decision timed
      here, ``policer_probe_seconds``.
    """

    def __init__(self, eng: Engine, policy_path: str | None = None) -> None:
        from policer.metrics import WorkerMetrics

        self.engine = eng
        self.metrics: WorkerMetrics | None = (
            eng.metrics if isinstance(eng.metrics, WorkerMetrics) else None)
        self.attributes = attribute_sources(eng.policy)
        path = policy_path or os.environ.get("POLICER_POLICY")
        # read, compiled and loaded in the background; swapped in by a later tick (the
        # engine's: it knows a reload is in flight and loads no library meanwhile)
        self.watcher = (PolicyWatcher(path, self._install, 1.0, on_result=self._reload_result,
                                      prepare=self._prepare, files=eng.policy.files)
                        if path else None)
        eng.watcher = self.watcher
        self._tables: dict[str, dict[str, int | str]] = {}  # what fill_tables wrote
        self._seen: dict[str, int] = {}
        self._failing = False
        self._deadline_terms: tuple[int, int] | None = None  # as last written

    # -- start and reload
    def start(self) -> None:
        self.engine.dialog_source = proxy_dialogs
        self.engine.start()
        self.fill_tables(self.engine.policy)

    def _reload(self, policy: Policy) -> None:
        """Reload now, in this thread (the watcher does the same in two halves)."""
        self._install(self._prepare(policy))

    def _prepare(self, policy: Policy) -> tuple[Prepared, dict[str, dict[str, int | str]]]:
        """The background half: refuse a policy whose call attributes differ from those
        the running cfg packs; the engine's preparation (library compiled and loaded);
        the fallback htables' new contents."""
        attributes = attribute_sources(policy)
        if attributes != self.attributes:
            raise ValueError(
                f"the new policy reads the call attributes {', '.join(attributes)} where the "
                f"running cfg packs {', '.join(self.attributes)}: restart Kamailio "
                "(deploy/kamailio/run generates the cfg again)")
        return self.engine.prepare(policy), fallback_tables(policy)

    def _install(self, prepared: tuple[Prepared, dict[str, dict[str, int | str]]]) -> None:
        """The quick half, in the timer's tick: swap the policy in, write the htable
        entries that changed."""
        ready, tables = prepared
        old = self.engine.policy
        self.engine.install(ready)
        policy = ready.policy
        self.fill_tables(policy, tables)
        if (policy.store_timeout_ms, policy.pending_queue) != (old.store_timeout_ms,
                                                                old.pending_queue):
            log("warn", "policer: store_timeout and pending_queue of the new policy apply "
                        "to the native cfg after a restart")

    def _reload_result(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reload(result)

    def fill_tables(self, policy: Policy,
                    tables: dict[str, dict[str, int | str]] | None = None) -> None:
        """Write :func:`fallback_tables` (or ``tables``, computed already) into the cfg's
        htables: the values that changed first, then the keys the old policy had and
        the new one has not are removed; and the deadline's terms (:meth:`set_deadline`)."""
        ht = ksr().htable
        self.set_deadline()
        for table, values in (tables or fallback_tables(policy)).items():
            written = self._tables.get(table, {})
            for key, value in values.items():
                if written.get(key) == value and key in written:
                    continue
                if isinstance(value, int):
                    ht.sht_seti(table, key, value)
                else:
                    ht.sht_sets(table, key, value)
            for key in written.keys() - values.keys():
                ht.sht_rm(table, key)
            self._tables[table] = dict(values)

    def set_deadline(self) -> None:
        """What the SIP workers add to their clock for the store's (ms): ``dl_add``, the
        admit's deadline (store_timeout minus this host's measured clock skew to Redis),
        and ``now_add`` (minus the skew), which a fallback's record carries."""
        skew = round(self.engine.clock_skew_ms)
        terms = (self.engine.policy.store_timeout_ms - skew, -skew)
        if terms == self._deadline_terms:
            return
        ht = ksr().htable
        ht.sht_seti(_SETTINGS, "dl_add", terms[0])
        ht.sht_seti(_SETTINGS, "now_add", terms[1])
        self._deadline_terms = terms

    # -- once a second
    def tick(self) -> None:
        self.engine.tick()  # (polls the policy watcher first)
        self.set_deadline()
        self._publish()
        probe(self.engine)

    def _counter(self, name: str) -> int:
        """How much a cfg counter grew since the last look (0 when unreadable)."""
        try:
            value = int(ksr().pv.get(f"$stat({name})") or 0)
        except (TypeError, ValueError):
            return 0
        grown = value - self._seen.get(name, 0)
        self._seen[name] = value
        return max(0, grown)

    def _publish(self) -> None:
        from policer.adapters.kamailio_cfg import bucket_counter, sum_counter
        from policer.metrics import DECISION_RESULTS, LATENCY_BUCKETS

        m = self.metrics
        decided = 0
        for result in DECISION_RESULTS:
            buckets = [self._counter(bucket_counter(result, i))
                       for i in range(len(LATENCY_BUCKETS) + 1)]
            us = self._counter(sum_counter(result))
            if result != "store_error":
                decided += sum(buckets)
            if m is not None and (any(buckets) or us):
                m.observed(result, buckets, us / 1e6)
        admit_errors = self._counter("policer_store_error_admit")
        batch_errors = self._counter("policer_store_error_batch")
        egress_errors = self._counter("policer_store_error_egress")
        applied = self._counter("policer_batches")
        admitted = self._counter("policer_fallback_admitted")
        rejected = self._counter("policer_fallback_rejected")
        self._counter("policer_ops")
        if admit_errors or batch_errors:
            self._failing = decided + applied == 0
        elif decided or applied:
            self._failing = False
        if m is None:
            return
        m.fallbacks(True, admitted)
        m.fallbacks(False, rejected)
        m.store_error("admit", admit_errors)
        m.store_error("batch", batch_errors)
        m.store_error("egress", egress_errors)
        k = ksr()
        try:
            queued = int(k.pv.get(f"$mq_size({QUEUE})") or 0)
            held = int(k.pv.get(f"$sht({_SETTINGS}=>held)") or 0)
            dropped = int(k.pv.get(f"$sht({_SETTINGS}=>dropped)") or 0)
        except (TypeError, ValueError):
            queued = held = dropped = 0
        m.pending(queued + held + self.engine.queued, dropped)
        m.breaker(self._failing or self.engine.store_failing)


_native: NativeTimer | None = None


def native_timer() -> NativeTimer:
    global _native
    if _native is None:
        _native = NativeTimer(engine())
    return _native


def start_native() -> int:
    """``mod_init`` of the native flavour (before the fork): build the engine (its
    policy file watched by :class:`NativeTimer`), start the node, fill the htables.
    Never raises, but for :class:`NodeInUse` (Kamailio must not start)."""
    global _native
    try:
        if factory_is_default():
            set_engine_factory(native_engine)
        native_timer().start()
    except NodeInUse as e:  # Kamailio must not start: it would end that one's calls
        log("err", f"policer: {e}")
        raise
    except Exception:
        forget()
        _native = None
        log_exception("start", "")
    return OK


class NativeHandler:
    """The object app_python3's ``mod_init()`` returns for ``python_exec``: only the
    timer's ``python_exec("tick")`` (``route[POLICER_TICK]``, once a second). The SIP
    workers call no Python: the cfg decides and queues by itself."""

    def child_init(self, rank: int) -> int:
        return 0

    def tick(self, msg: object, args: str | None = None) -> int:
        """``python_exec("tick")`` from the rtimer route, about once a second."""
        try:
            native_timer().tick()
        except Exception:
            log_exception("tick", "")
        return OK
