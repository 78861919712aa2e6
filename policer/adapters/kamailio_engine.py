"""The one engine of a Kamailio instance (both flavours), built on first use.

:func:`start` builds it in ``mod_init``, before Kamailio forks its workers: the store
opens its Redis connections per process id, so every process that uses it gets its
own, and each worker is spared the policy load. Tests and embedders build it their own
way with :func:`set_engine_factory`.
"""

from __future__ import annotations

from collections.abc import Callable

from policer.adapters.kamailio_ksr import OK, log, log_exception, proxy_dialogs
from policer.engine import Engine, NodeInUse
from policer.store import StoreError

__all__ = ["current", "engine", "factory_is_default", "forget", "probe",
           "set_engine_factory", "start", "tick"]


def _default_factory() -> Engine:
    return Engine.from_env()


_factory: Callable[[], Engine] = _default_factory
_engine: Engine | None = None


def set_engine_factory(factory: Callable[[], Engine] | None = None) -> None:
    """Build the engine with ``factory`` from now on (``None``: ``Engine.from_env()``);
    forgets the current one. For tests and embedders."""
    global _factory, _engine
    _factory = factory or _default_factory
    _engine = None


def factory_is_default() -> bool:
    """No factory was set: the engine is ``Engine.from_env()``."""
    return _factory is _default_factory


def engine() -> Engine:
    """This proxy's engine, built on first use.

    One engine serves the main process and every worker forked from it: the
    store opens its Redis connections per process id, so building it before
    Kamailio forks (in :func:`start`) is fine and saves each worker the policy load.
    """
    global _engine
    if _engine is None:
        _engine = _factory()
    return _engine


def current() -> Engine | None:
    """The engine if it was built (None: not yet, or forgotten)."""
    return _engine


def forget() -> None:
    """Forget the engine: the next :func:`engine` builds it again (after a failed start)."""
    global _engine
    _engine = None


def start() -> int:
    """Once per Kamailio start, before the workers fork (``mod_init``): build the
    engine, end the dialogs this node (``POLICER_NODE``) left behind in an
    earlier run and take its lease. A failure is logged and the engine is built again
    on first use; but a node name another live Kamailio holds raises
    :class:`NodeInUse` (Kamailio must not start: it would end that one's calls)."""
    try:
        eng = engine()
        eng.dialog_source = proxy_dialogs
        eng.start()
    except NodeInUse as e:
        log("err", f"policer: {e}")
        raise
    except Exception:
        forget()
        log_exception("start", "")
    return OK


def tick() -> int:
    """About once a second from a timer process (rtimer): renew the lease, end
    dialogs of lost nodes, apply queued operations, reload a changed policy."""
    try:
        engine().tick()
    except Exception:
        log_exception("tick", "")
    return OK


def probe(eng: Engine) -> None:
    """One dry-run decision (explain: writes nothing), timed in a timer process: what a
    decision costs from this proxy right now, with or without traffic
    (``policer_probe_seconds``). Never raises."""
    from policer.metrics import WorkerMetrics

    m = eng.metrics
    if not isinstance(m, WorkerMetrics):
        return
    try:
        seconds = eng.probe()
    except StoreError:
        m.store_error("probe")
        return
    except Exception:
        log_exception("probe", "")
        return
    if seconds is not None:
        m.probe(seconds)
