"""``policer serve``: the decision service, for SIP cores that cannot import Python
(FreeSWITCH, Asterisk, OpenSIPS, SBCs, B2BUAs) but can make an HTTP request per call.

=====================  =====================================================
``POST /v1/admit``      a call's attributes -> the decision (``policer admit --json``)
``POST /v1/explain``    the same body -> the dry run (``policer explain --json``)
``POST /v1/confirm``    ``{"dialog_id"}`` (or ``{"call_id", "from_tag"}``): answered
``POST /v1/refresh``    ``{"dialog_id", "timeout"?}``: push a live dialog's deadline on
``POST /v1/release``    ``{"dialog_id", "reason"?}``: the call ended (idempotent)
``POST /v1/settle``     a call the client decided by its own fallback
``POST /v1/sync``       the client's dialogs, put back after the store lost them
``GET /v1/health``      200 when the store answers, 503 with the reason when not
``GET /metrics``        the exporter's metric families (Prometheus text)
=====================  =====================================================

Every call is idempotent as the engine is: an admit retried with the same Call-ID
and From-tag returns the earlier decision (``duplicate: true``), a second release
finds no live dialog. When Redis is down an admit answers 200 with the policy's
``on_store_error`` decision (``fallback: true``); a dialog event is queued in order in
the worker's bounded queue and applied as soon as the store answers (202,
``queued: true``); explain and health answer 503.

Each worker process runs one engine; ``--workers`` processes share one listening
socket. Nothing waits for Redis in a worker's event loop, and no answer waits longer
than the policy's ``store_timeout`` for a store that does not answer (/metrics
excepted). The parts, one job each:

- :mod:`~policer.serve.service`: the routes over the engine (:class:`Service`): what
  each request means and answers; no HTTP in it.
- :mod:`~policer.serve.bodies`: request bodies read (the call, the dialog id, when the
  client stops waiting) and answers' JSON.
- :mod:`~policer.serve.http_server`: HTTP/1.1 written here on httptools' parser
  (llhttp, C) and uvloop, no framework and no ASGI layer, with the bounds a client
  meets before any token is checked (docs/security.md). An interleaved measurement
  against uvicorn with httptools and against the standard library's threaded server
  decided that it stays (``benchmarks/serve.py --stacks``, docs/benchmarks.md,
  "Decision service: HTTP server").
- :mod:`~policer.serve.admits`: the admits, sent from the event loop on the store's
  admit pipeline (:mod:`policer.store.pipeline`: a Redis connection of the worker's
  own, several calls in flight) and decided by the engine, or by the fallback.
- :mod:`~policer.serve.store_thread`: the blocking store calls (dialog events,
  explain, health, /metrics, sync) in a thread of the worker, one after another.
- :mod:`~policer.serve.ticker`: the engine's tick, once a second, in each worker.
- :mod:`~policer.serve.worker`: one worker process's event loop.
- :mod:`~policer.serve.supervisor`: the node's start, the prefork workers, shared
  metrics.
- :mod:`~policer.serve.listener`: the listening socket and who may use it.
"""

from __future__ import annotations

from policer.serve.http_server import MAX_BODY, Limits
from policer.serve.listener import ServeError, bind, check_listener, is_loopback, read_token
from policer.serve.service import Response, Service
from policer.serve.supervisor import prepare_metrics, run
from policer.serve.worker import serve_forever

__all__ = [
    "MAX_BODY",
    "Limits",
    "Response",
    "ServeError",
    "Service",
    "bind",
    "check_listener",
    "is_loopback",
    "prepare_metrics",
    "read_token",
    "run",
    "serve_forever",
]
