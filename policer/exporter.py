"""``policer exporter``: serves ``/metrics`` for Prometheus.

Cluster-wide state comes from the store at each scrape (one exporter serves
every proxy); the deciding processes' own metrics (latency, store errors,
fallbacks) come from ``PROMETHEUS_MULTIPROC_DIR`` when it is set, so one
exporter per proxy host also serves its Kamailio workers as one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Mapping

from prometheus_client import start_http_server

from policer.log import get_logger
from policer.metrics import ClusterCollector, worker_registry
from policer.policy import Policy
from policer.store.base import AdminStore

__all__ = ["parse_listen", "parse_values", "serve"]


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9477`` for IPv6) to ``(host, port)``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_values(specs: Iterable[str]) -> dict[str, list[str]]:
    """``account=acme,globex`` (repeatable) to ``{"account": ["acme", "globex"]}``."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        profile, sep, values = spec.partition("=")
        if not sep or not profile:
            raise ValueError(f"--values {spec!r}: expected PROFILE=VALUE[,VALUE...]")
        out.setdefault(profile, []).extend(v for v in values.split(",") if v)
    return out


def serve(policy: Policy, store: AdminStore, listen: str, top: int = 10,
          listed: Mapping[str, Iterable[str]] | None = None,
          stop: threading.Event | None = None, policy_path: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set). ``policy_path``: the policy file
    watched: a changed (valid) file is read again at the next scrape, so a new profile
    or fraud rule gets its series without a restart."""
    host, port = parse_listen(listen)
    registry = worker_registry()
    collector = ClusterCollector(policy, store, top=top, listed=listed)
    if policy_path is not None:
        collector.watch(policy_path)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    log = get_logger("policer.exporter")
    log.info("exporter_listening", listen=f"{host}:{port}", namespace=policy.namespace)
    done = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        server.shutdown()
        thread.join(timeout=5)
        log.info("exporter_stopped")
