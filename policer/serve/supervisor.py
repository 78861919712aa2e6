"""Starting the decision service: the node starts once, then ``--workers`` processes
fork from here and share the listening socket; a worker that dies is started again.
With several workers, their decision metrics go to one directory (prometheus-client's
multiprocess mode), so /metrics shows them all whichever worker answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from policer.log import get_logger
from policer.serve.http_server import DEFAULT_LIMITS, Limits
from policer.serve.listener import bind
from policer.serve.service import Service
from policer.serve.worker import serve_forever

if TYPE_CHECKING:  # imported by the caller, after prepare_metrics (prometheus-client)
    from policer.engine import Engine

__all__ = ["metrics_renderer", "prepare_metrics", "run"]

_own_metrics_dir: str | None = None


def prepare_metrics(workers: int) -> None:
    """Before the engine exists (prometheus-client reads this when first imported):
    with several workers, every worker's decision metrics go to a directory they
    share, so /metrics shows them all whichever worker answers."""
    global _own_metrics_dir
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        _own_metrics_dir = tempfile.mkdtemp(prefix="policer-serve-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir


def metrics_renderer(engine: Engine) -> Callable[[], bytes]:
    """What /metrics answers: the cluster-wide families of the exporter and the
    workers' decision metrics."""
    from prometheus_client import REGISTRY, generate_latest

    from policer.metrics import ClusterCollector, worker_registry

    registry = worker_registry()
    registry.register(ClusterCollector(engine.policy, engine.store))
    # the decision latency and the other worker metrics: every worker's when they
    # share PROMETHEUS_MULTIPROC_DIR, else this process's own
    own = None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else REGISTRY

    def render() -> bytes:
        out = generate_latest(registry)
        return out + generate_latest(own) if own is not None else out

    return render


def run(engine: Engine, host: str, port: int, workers: int = 1,
        token: str | None = None, limits: Limits = DEFAULT_LIMITS) -> int:
    """Serve until SIGTERM/SIGINT. The node starts once (its dialogs from an earlier
    run end, it takes its lease), then ``workers`` processes fork from here and share
    the listening socket; each keeps the engine's tick going. A node another live
    process holds (its lease renewed within one renew interval) is not taken:
    :class:`policer.engine.NodeInUse` is raised before anything is served."""
    log = get_logger("policer.serve")
    sock = bind(host, port, listen=False)
    _raise_fd_limit(limits.max_connections + 64, log)
    try:
        engine.start()  # raises NodeInUse: another live process holds this node
    except BaseException:
        sock.close()
        raise
    sock.listen(1024)  # no client is accepted before the node is this service's
    service = Service(engine, token, metrics_renderer(engine))
    log.info("serve_listening", listen=f"{host}:{sock.getsockname()[1]}", workers=workers,
             node=engine.node, namespace=engine.policy.namespace, token=token is not None,
             max_connections=limits.max_connections, head_timeout=limits.head_timeout,
             idle_timeout=limits.idle_timeout)
    if workers <= 1:
        serve_forever(service, sock, limits)
        return 0
    return _supervise(service, sock, workers, log, limits)


def _raise_fd_limit(need: int, log: Any) -> None:
    """Let a worker hold its connections: the soft limit of open files raised to
    ``need`` (up to the hard limit; a warning when that is lower)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft < need:
        log.warning("serve_fd_limit", open_files=soft, wanted=need,
                    hint="raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower "
                         "--max-connections")


def _supervise(service: Service, sock: socket.socket, workers: int, log: Any,
               limits: Limits) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                serve_forever(service, sock, limits)
            except BaseException as e:
                code = 1
                log.error("serve_worker_failed", worker=index, error=repr(e))
            finally:
                os._exit(code)
        children[pid] = index

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(workers):
        spawn(i)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        log.error("serve_worker_died", worker=index, pid=pid,
                  status=os.waitstatus_to_exitcode(status))
        time.sleep(0.2)  # never spin on a worker that dies at once
        if not stopping:
            spawn(index)
    sock.close()
    if _own_metrics_dir is not None:
        import shutil

        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
    log.info("serve_stopped")
    return 0
