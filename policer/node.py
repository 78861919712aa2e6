"""A proxy node's life in the store, apart from its decisions: the node's start (its
earlier run's dialogs ended, its lease taken, one live owner per node name), the lease
renewed and lost nodes swept by the tick, the clock skew to the store measured, the
policy's library kept loaded (loaded again when Redis lost it, a big one in the
background), a store that lost its state noticed and this node's live calls put back
(resync).

:class:`NodeLifecycle` is composed by :class:`policer.engine.Engine`, which keeps the
public API (``engine.start()``, ``engine.tick()``, ``engine.resync()``); it knows the
engine only through the few callables it is given.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from policer.compile import TICK_BATCH
from policer.policy import Policy
from policer.reload import Job
from policer.store.base import LibraryStore, Store, StoreError, StoreInfo
from policer.store.redis_store import INLINE_LOAD_BYTES

if TYPE_CHECKING:
    from policer.reconcile import ProxyDialog, Report

__all__ = ["RESYNC_MARGIN_MS", "SKEW_WARN_MS", "NodeInUse", "NodeLifecycle", "SkewEstimate"]

#: A clock skew to the store beyond this (ms) is logged (decisions stay right: every
#: deadline is corrected by the measured skew); policer_node_clock_skew_seconds shows it.
SKEW_WARN_MS = 500
#: A resync leaves alone what was admitted within this long before its dialog list was
#: taken (a call admitted while its dialog is being created in the proxy).
RESYNC_MARGIN_MS = 1_000


class NodeInUse(RuntimeError):
    """Another live instance renews this node's lease: this one must not start."""

    def __init__(self, node: str) -> None:
        super().__init__(
            f"node {node!r} is in use: another live process renews its lease (a second "
            "proxy or decision service with the same node name would end its calls); "
            "give this one another name with --node or POLICER_NODE")
        self.node = node


class SkewEstimate:
    """This process's clock minus the store's (ms), from readings of the store's clock
    (each: the offset at the midpoint of its round trip, and the round trip): the
    reading with the shortest round trip among the last few, whose error is at most
    half of it."""

    def __init__(self, keep: int = 8) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)
        self.value = 0.0

    def add(self, skew_ms: float, rtt_ms: float) -> float:
        self._samples.append((rtt_ms, skew_ms))
        self.value = min(self._samples)[1]
        return self.value


class NodeLifecycle:
    """One node (proxy) of a store: its name, this process's instance of it, its lease,
    the library it keeps loaded and the state epoch it saw.

    ``policy``: the policy in force (swapped on reload); ``failed``: a store call failed
    (counts toward the circuit breaker); ``answered``: the store answered (closes an
    open breaker); ``store_error``: log and count a failed store call (op, dialog id,
    error); ``reloading``: a reload is loading its library now (then nothing is loaded
    here). ``log``: the engine's logger (the events keep their names)."""

    def __init__(self, name: str, store: Store, policy: Callable[[], Policy], log: Any,
                 *, failed: Callable[[], None], answered: Callable[[], None],
                 store_error: Callable[[str, str, StoreError], None],
                 reloading: Callable[[], bool]) -> None:
        self.name = name
        self.store = store
        self._policy = policy
        self.log = log
        self._failed = failed
        self._answered = answered
        self._store_error = store_error
        self._reloading = reloading
        #: this process's instance of the node (its lease's owner)
        self.instance = uuid.uuid4().hex[:16]
        #: the node's live calls (Kamailio's dlg.list), to put back when the store lost
        #: them (:meth:`resync`); None: this node cannot
        self.dialog_source: Callable[[], Iterable[ProxyDialog]] | None = None
        self._next_renew = 0.0
        self._loaded = False  # this node made sure Redis decides by its policy
        self._skew = SkewEstimate()
        self._next_skew_warning = 0.0
        self._epoch: str | None = None  # the store's state epoch as last seen
        self._resync_due = False
        self._waiting_for_list = False
        self._loader: Job[str] | None = None  # a load of its library in the background
        self._next_load = 0.0

    @property
    def resync_due(self) -> bool:
        """The store lost this node's calls and they are not back yet (:meth:`resync`)."""
        return self._resync_due

    def renew_soon(self) -> None:
        """Renew the lease at the next :meth:`renew`, not a renew interval later."""
        self._next_renew = 0.0

    def installed(self, policy_hash: str) -> None:
        """A reload swapped a policy in (its library loaded when ``policy_hash``)."""
        self._loaded = bool(policy_hash)
        self._loader = None  # a load of the previous library in flight is of no use

    def start(self) -> None:
        """See :meth:`policer.engine.Engine.start`."""
        policy = self._policy()
        nodes = policy.nodes
        try:
            self._read_store()
            self.store.load(policy)
            self._loaded = True
            # a second reading of the store's clock: the first may have waited on a Redis
            # just started (or busy), and the skew's error is half the round trip of the
            # best reading; the node's first deadlines are computed from it
            self._read_store()
            waited = False
            for _ in range(100_000):  # each round ends a bounded batch
                r = self.store.tick(self.name, nodes.lease_ms,
                                    nodes.on_node_loss == "release", start=True,
                                    skew_ms=self._skew.value, instance=self.instance,
                                    renew_ms=nodes.renew_ms)
                if r.owner:
                    wait_ms = int(r.owner.partition(":")[2] or 0)
                    if waited:
                        raise NodeInUse(self.name)
                    # its last renewal may be the crashed owner's last: wait until a live
                    # owner would have renewed again, then ask once more
                    self.log.warning("node_in_use_waiting", wait_ms=wait_ms)
                    time.sleep(wait_ms / 1000)
                    waited = True
                    continue
                self._epoch = r.epoch or self._epoch
                if r.left == 0:
                    break
        except StoreError as e:
            self._store_error("start", "", e)
            return
        self._next_renew = time.monotonic() + nodes.renew_ms / 1000
        self.log.info("node_started", lease_ms=nodes.lease_ms, renew_ms=nodes.renew_ms,
                      instance=self.instance)

    def renew(self) -> None:
        """When due (a renew interval, or the store lost this node's calls): renew the
        lease and end dialogs of lost nodes and past their deadline, in bounded calls."""
        now = time.monotonic()
        if now < self._next_renew and not self._resync_due:
            return
        nodes = self._policy().nodes
        self._next_renew = now + nodes.renew_ms / 1000
        swept = 0
        try:
            for _ in range(100):  # each call ends a bounded batch
                r = self.store.tick(self.name, nodes.lease_ms,
                                    nodes.on_node_loss == "release",
                                    skew_ms=self._skew.value, instance=self.instance,
                                    renew_ms=nodes.renew_ms)
                swept += r.swept
                if r.lapsed:
                    self.log.warning("lease_lapsed", lease_ms=nodes.lease_ms)
                    self._resync_due = True
                if r.swept < TICK_BATCH and r.expired < TICK_BATCH:
                    break
        except StoreError as e:
            self._failed()
            self._store_error("renew", "", e)
        else:
            self._answered()
        if swept:
            self.log.warning("lost_node_dialogs_ended", count=swept)

    def _read_store(self) -> StoreInfo:
        """One reading of the store (raises StoreError): its clock (this node's skew to
        it is kept, and logged when beyond :data:`SKEW_WARN_MS`), library and epoch."""
        info = self.store.info()
        skew = self._skew.add(info.skew_ms, info.rtt_ms)
        self.store.clock_skew_ms = skew
        if abs(skew) > SKEW_WARN_MS and time.monotonic() >= self._next_skew_warning:
            self._next_skew_warning = time.monotonic() + 60
            self.log.warning("clock_skew", skew_ms=round(skew),
                             bound_ms=SKEW_WARN_MS,
                             hint="this host's clock differs from Redis's; decisions stay "
                                  "right (deadlines are corrected), fix NTP")
        return info

    def ensure_loaded(self) -> bool:
        """Once a tick: read the store (:meth:`_read_store`). A Redis that lost the
        library (restarted empty, failed over to a replica without it) gets it back
        within a tick, and so does a node whose start() (or whose last reload) could not
        load it; else a library another node loaded is the policy in force: it is never
        replaced here (``policer load`` and a changed policy file do that). A big library
        that Redis must replace while it holds another one is loaded in the background:
        the lease is renewed meanwhile.

        A store that lost its state is noticed here too: the library was gone, the
        namespace's state epoch changed (another node noticed first), or another Redis
        server answers than the one the epoch was confirmed on (a restart from its AOF,
        a failover). A new epoch holds admits while every node puts its live calls back
        (:meth:`resync`, this tick). False when the store did not answer."""
        try:
            self._loader_done()
            info = self._read_store()
            known = self._epoch
            # a load in flight (of a reload, or in the background) does the work
            if self._loader is None and not self._reloading():
                held = info.policy_hash
                if held is None or (not self._loaded and not self._big_library()):
                    # not yet loaded by this node (its start() could not), or lost by Redis
                    why = "the store had none" if self._loaded else "not loaded at start"
                    op = None
                    if held is None:
                        op = f"missing:{known or ''}" if self._loaded or known else "init"
                    policy_hash = self.store.load(self._policy(), epoch=op)
                    self._loaded = True
                    self.log.warning("policy_library_loaded", policy_hash=policy_hash,
                                     why=why)
                    # a Redis that lost the library lost the node's lease and
                    # registration too: renew them in this tick, not an interval later
                    self.renew_soon()
                    info = self.store.info()
                elif not self._loaded and time.monotonic() >= self._next_load:
                    store, policy = self.store, self._policy()
                    assert isinstance(store, LibraryStore)
                    library = store.library
                    self._loader = Job(lambda: store.load_library(library, policy),
                                       "policer-load")
            if info.policy_hash is None:
                return True  # loaded in the background: the epoch is read next tick
            epoch = info.epoch
            if not epoch:
                epoch = self.store.tick("", 0, False, epoch=f"lost:{known}" if known
                                        else "init").epoch
            elif info.mark and info.epoch_mark != info.mark:
                # another server than the epoch's (a restart from RDB or AOF, a failover):
                # its state may lack the last writes
                self.log.warning("store_server_changed", mark=info.mark,
                                 epoch_mark=info.epoch_mark)
                epoch = self.store.tick("", 0, False, epoch=f"lost:{epoch}").epoch
            if known is not None and epoch != known:
                self.log.warning("store_state_lost", epoch=epoch, was=known)
                self._resync_due = True
                self.renew_soon()
            self._epoch = epoch
        except StoreError as e:
            self._failed()
            self._store_error("load", "", e)
            return False
        self._answered()
        return True

    def _big_library(self) -> bool:
        store = self.store
        return isinstance(store, LibraryStore) and len(store.library.text) > INLINE_LOAD_BYTES

    def _loader_done(self) -> None:
        """The end of a background load of this node's library, if it ended."""
        job = self._loader
        if job is None or not job.done():
            return
        self._loader = None
        try:
            policy_hash = job.result()
        except StoreError as e:
            self._next_load = time.monotonic() + 5.0
            self._store_error("load", "", e)
            return
        self._loaded = True
        self.log.warning("policy_library_loaded", policy_hash=policy_hash,
                         why="not loaded by the reload")

    def resync(self, dialogs: Iterable[ProxyDialog] | None = None) -> Report | None:
        """See :meth:`policer.engine.Engine.resync`."""
        from policer.reconcile import reconcile

        source = self.dialog_source
        if dialogs is None and source is None:
            if not self._waiting_for_list:
                self._waiting_for_list = True
                self.log.warning("store_state_lost_waiting_for_dialogs",
                                 why="this node's calls come back when its proxy sends its "
                                     "dialog list (policer serve: POST /v1/sync; or "
                                     "policer reconcile --proxy)")
            return None
        try:
            listed_at = self.store.now_ms() - RESYNC_MARGIN_MS
            if dialogs is None:
                assert source is not None
                dialogs = source()
            report = reconcile(self._policy(), self.store, self.name, dialogs,
                               listed_at_ms=listed_at)
        except StoreError as e:
            self._store_error("resync", "", e)
            return None
        except Exception as e:  # the dialog list could not be read: next tick
            self.log.error("resync_failed", error=repr(e))
            return None
        self._resync_due = False
        self._waiting_for_list = False
        self.log.warning("resynced", proxy_dialogs=report.proxy_dialogs, kept=report.kept,
                         added=len(report.added), removed=len(report.removed),
                         partial=len(report.partial))
        return report
