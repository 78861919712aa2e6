"""``policer serve``: the decision service, for SIP cores that cannot import Python
(FreeSWITCH, Asterisk, OpenSIPS, SBCs, B2BUAs) but can make an HTTP request per call.

HTTP/1.1 with keep-alive on a server written here (:class:`HttpProtocol`): httptools'
parser (llhttp, C) on uvloop, no framework and no ASGI layer between the socket and
:class:`Service` (the stack was chosen by measurement: ``benchmarks/serve.py``,
``docs/benchmarks.md``, "Decision service"). What a client can make it hold or wait
for is bounded before any token is checked (docs/security.md): a request's head
(:data:`MAX_HEAD`, counted as it arrives) and body (:data:`MAX_BODY`), the time a
request may take to arrive (``--head-timeout``), idle connections (``--idle-timeout``)
and the connections of a worker (``--max-connections``).

=====================  =====================================================
``POST /v1/admit``      a call's attributes -> the decision (``policer admit --json``)
``POST /v1/explain``    the same body -> the dry run (``policer explain --json``)
``POST /v1/confirm``    ``{"dialog_id"}`` (or ``{"call_id", "from_tag"}``): answered
``POST /v1/refresh``    ``{"dialog_id", "timeout"?}``: push a live dialog's deadline on
``POST /v1/release``    ``{"dialog_id", "reason"?}``: the call ended (idempotent)
``GET /v1/health``      200 when the store answers, 503 with the reason when not
``GET /metrics``        the exporter's metric families (Prometheus text)
=====================  =====================================================

Every call is idempotent as the engine is: an admit retried with the same Call-ID
and From-tag returns the earlier decision (``duplicate: true``), a second release
finds no live dialog. When Redis is down an admit answers 200 with the policy's
``on_store_error`` decision (``fallback: true``).

Dialog events go through the engine's event path: applied at once, one store call
each (the client learns whether the dialog was live), and while the store does not
answer queued in order in the worker's bounded queue and applied as soon as it does
(``queued: true`` in the answer, status 202). The engine's :meth:`~Engine.tick`
(lease, queued events, policy file reload) runs once a second in every worker.

Each worker process runs one engine; ``--workers`` processes share one listening
socket. Nothing waits for Redis in the worker's event loop. Admits' ``FCALL``s go to
Redis on the worker's own connection (:class:`Admits`), several in flight, those read
in one turn of the loop in one write, each answered when its reply is read. Dialog
events, explain, health and /metrics call the engine's blocking store client in a
thread of the worker (:class:`StoreCalls`, one call after another, in order). No
answer waits longer than the policy's ``store_timeout`` for a store that does not
answer (/metrics excepted): an admit then gets the fallback decision, a dialog event
202 ``queued``, explain and health 503; while the circuit breaker is open, or the
admits' connection is down, admits are decided by the fallback at once and the
connection is opened again in the background.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import hiredis
import httptools
import orjson

from policer.call import Call
from policer.log import get_logger
from policer.printable import printable_data
from policer.store import Op, StoreError
from policer.store.base import END_REASONS, CallRecord
from policer.store.keys import dialog_id
from policer.store.redis_store import call_result, store_error

if TYPE_CHECKING:  # imported by the caller, after prepare_metrics (prometheus-client)
    from policer.engine import Engine

__all__ = [
    "HEAD_TIMEOUT_S",
    "IDLE_S",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "SYNC_MAX_BODY",
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

#: Largest request body accepted (bytes); larger ones get 413.
MAX_BODY = 64 * 1024
#: Largest body of ``POST /v1/sync`` (a proxy's dialog list, about 1.5 KB a dialog).
SYNC_MAX_BODY = 16 * 1024 * 1024
#: Seconds between two runs of the engine's tick in each worker.
TICK_S = 1.0
#: Longest dialog id accepted: two key parts of at most 200 characters and a ';'.
MAX_DIALOG_ID = 401
#: What a dialog id policer handed out is made of (``policer.call.key_part`` twice).
_DIALOG_ID = re.compile(r"[A-Za-z0-9_.@%~-]*;[A-Za-z0-9_.@%~-]*")
_CALL_FIELDS = ("from_user", "from_domain", "ruri_user", "to_user", "source_ip", "auth_user")
_END_REASONS = frozenset(END_REASONS)

JSON = b"application/json"
METRICS = b"text/plain; version=0.0.4; charset=utf-8"


class ServeError(Exception):
    """A setting ``policer serve`` cannot start with (exit status 2)."""


class BadRequest(Exception):
    """The request is malformed: 400 with this message."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    close: bool = False  # close the connection after this answer


def _dumps(obj: Any) -> bytes:
    """JSON of an answer, every string in the printable form (policer.printable), as
    ``policer admit --json`` prints it: a byte that is not UTF-8 (orjson refuses its
    surrogate escape) as ``\\xff``, a control character as ``\\x1b``, a backslash as
    ``\\\\``. An answer none of whose strings holds such a character (no backslash in
    orjson's text: it escapes C0 controls, quotes and backslashes; no DEL; no 0xC2,
    which starts every C1 control) is sent as orjson wrote it."""
    try:
        out = orjson.dumps(obj)
        if b"\\" not in out and b"\x7f" not in out and b"\xc2" not in out:
            return out
    except TypeError:
        pass
    shown = printable_data(obj)
    try:
        return orjson.dumps(shown)
    except TypeError:
        return json.dumps(shown).encode()


def _loads(body: bytes) -> Any:
    """The request's JSON: UTF-8 JSON text (RFC 8259) and nothing else. orjson first;
    JSON text with a lone surrogate escape (``"\\ud800"``, valid JSON that orjson
    refuses) is read by the standard library, whose str keeps it (the engine's Call
    handles such strings), held to what orjson takes otherwise: no byte order mark,
    UTF-8 only (no UTF-16 or UTF-32 guessed from the bytes), no NaN or Infinity (nor a
    number too large for a double)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        first = e
    if body.startswith(b"\xef\xbb\xbf"):
        raise BadRequest("malformed JSON: a UTF-8 byte order mark is not JSON") from None
    try:
        text = body.decode("utf-8", "surrogatepass")
        return json.loads(text, parse_constant=_not_a_number, parse_float=_finite)
    except BadRequest:
        raise
    except (ValueError, RecursionError):
        raise BadRequest(f"malformed JSON: {first}") from None


def _not_a_number(name: str) -> Any:
    raise BadRequest(f"malformed JSON: {name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"malformed JSON: {text[:40]} is too large for a number")
    return value


def _error(status: int, message: str, close: bool = False) -> Response:
    return Response(status, _dumps({"error": message}), close=close)


_NOT_FOUND = _error(404, "not found")
#: A client without the token gets one answer per connection.
_UNAUTHORIZED = _error(401, "missing or wrong bearer token", close=True)
_TOO_LARGE = _error(413, f"request body over {MAX_BODY} bytes ({SYNC_MAX_BODY} for /v1/sync)",
                    close=True)


def _text(body: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise BadRequest(f"{name!r} is required")
        return None
    if not isinstance(v, str):
        raise BadRequest(f"{name!r} must be a string")
    return v


def _call_id(body: Mapping[str, Any]) -> str:
    """The request's ``call_id``: a non-empty string (a SIP Call-ID is never empty)."""
    call_id = _text(body, "call_id", True)
    if not call_id:
        raise BadRequest("'call_id' must not be empty")
    return call_id


def _object(body: bytes) -> dict[str, Any]:
    data = _loads(body)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def call_from_body(body: bytes) -> Call:
    """The :class:`Call` of an admit (or explain) body; raises BadRequest."""
    return _call_of(_object(body))


def client_deadline(body: bytes | Mapping[str, Any], engine: Engine) -> int | None:
    """When an admit's client stops waiting, in the store's clock: its ``sent`` (its
    clock when it sent the request, Unix seconds) plus ``timeout_ms``, read with this
    host's clock skew to the store (the client's clock is taken for this host's: the
    Kamailio http flavour runs beside the service); None when it does not say.
    Raises BadRequest."""
    data = _object(body) if isinstance(body, bytes) else body
    sent, timeout = data.get("sent"), data.get("timeout_ms", 1000)
    if sent is None:
        return None
    try:
        s = float(sent)
    except (TypeError, ValueError):
        raise BadRequest("'sent' must be Unix seconds") from None
    if not (isinstance(timeout, int) and not isinstance(timeout, bool)
            and 0 < timeout <= 3_600_000) or not 0 < s < 1e11:
        raise BadRequest("'sent' must be Unix seconds and 'timeout_ms' a positive number "
                         "of ms")
    store = engine.store
    return int(s * 1000 - store.clock_skew_ms) + int(getattr(store, "clock_offset_ms", 0)) \
        + timeout


def _call_of(data: Mapping[str, Any]) -> Call:
    call_id = _call_id(data)
    from_tag = _text(data, "from_tag", True)
    fields = {name: _text(data, name) for name in _CALL_FIELDS}
    headers = data.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise BadRequest("'headers' must be an object of strings")
        for k, v in headers.items():
            if v is not None and not isinstance(v, str):
                raise BadRequest(f"headers[{k!r}] must be a string")
    return Call.from_raw(call_id, from_tag, headers=headers, **fields)


def dialog_id_from_body(data: Mapping[str, Any]) -> str:
    """The dialog id of an event body, as admit handed it out, or made from the raw
    ``call_id`` and ``from_tag`` (a proxy that did not keep the id, e.g. for a BYE of
    a dialog another proxy set up); raises BadRequest. Ids policer did not make
    (braces, separators, white space) are refused, so no client can name another key."""
    if "dialog_id" not in data and "call_id" in data:
        return dialog_id(_call_id(data), _text(data, "from_tag", True))
    did = _text(data, "dialog_id", True)
    assert did is not None
    if len(did) > MAX_DIALOG_ID or not _DIALOG_ID.fullmatch(did):
        raise BadRequest("'dialog_id' is not a dialog id policer gave")
    return did


class Job:
    """The part of a request that asks the store: ``run`` makes the blocking store
    calls and gives the answer (in the worker's store thread, :class:`StoreCalls`);
    ``late`` gives the answer instead when the store has not within the policy's
    store timeout (None: no deadline). ``skip_late``: a job not started by then is not
    run at all (a question already answered); else it runs anyway (a dialog event is
    applied, or queued by the engine, whatever the client was told)."""

    __slots__ = ("late", "run", "skip_late")

    def __init__(self, run: Callable[[], Response], late: Callable[[], Response] | None,
                 skip_late: bool = True) -> None:
        self.run = run
        self.late = late
        self.skip_late = skip_late


class Service:
    """The routes, over one engine; no HTTP server in here (the server adapter reads
    the request and writes the :class:`Response`). Never raises.

    :meth:`route` answers at once what needs no store (bad requests, unknown paths)
    and hands the rest back as a :class:`Job` the server runs away from its event
    loop; :meth:`handle` runs it on the spot (a server with no store thread)."""

    def __init__(self, engine: Engine, token: str | None = None,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.engine = engine
        self._token = token.encode() if token else None
        self._metrics = metrics
        self.log = get_logger("policer.serve")
        self._post: dict[str, Callable[[bytes], Response | Job]] = {
            "/v1/admit": self.admit,
            "/v1/explain": self.explain,
            "/v1/confirm": self.confirm,
            "/v1/refresh": self.refresh,
            "/v1/release": self.release,
            "/v1/settle": self.settle,
            "/v1/sync": self.sync,
        }
        self._get: dict[str, Callable[[], Response | Job]] = {
            "/v1/health": self.health,
            "/metrics": self.metrics,
        }

    def authorized(self, authorization: bytes | None) -> bool:
        """``Authorization: Bearer TOKEN``: the scheme in any case (RFC 9110, 11.1),
        then one or more spaces, then the token, compared exactly in constant time."""
        if self._token is None:
            return True
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "),
                                                                   self._token)

    def route(self, method: str, path: str, body: bytes) -> Response | Job:
        """One request whose credentials were checked (:meth:`authorized`): its answer,
        or the :class:`Job` that gives it."""
        try:
            post = self._post.get(path)
            if post is not None:
                return post(body) if method == "POST" else _method_not_allowed("POST")
            get = self._get.get(path)
            if get is not None:
                return get() if method in ("GET", "HEAD") else _method_not_allowed("GET")
            return _NOT_FOUND
        except BadRequest as e:
            return _error(400, str(e))
        except Exception as e:  # a bug must never become a traceback or a dropped call
            self.log.error("request_failed", path=path, error=repr(e))
            return _error(500, "internal error")

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """One request whose credentials were checked, answered on the spot (its store
        calls made here, blocking)."""
        r = self.route(method, path, body)
        return r if isinstance(r, Response) else self.run(r, path)

    def run(self, job: Job, path: str = "") -> Response:
        """A job's answer; never raises."""
        try:
            return job.run()
        except Exception as e:  # a bug must never become a traceback or a dropped call
            self.log.error("request_failed", path=path, error=repr(e))
            return _error(500, "internal error")

    def no_answer(self) -> str:
        """Why a store call is given up: it is later than the policy's store timeout."""
        return (f"TimeoutError: no answer from the store in "
                f"{self.engine.policy.store_timeout_ms} ms")

    # -- routes
    def admit(self, body: bytes) -> Job:
        call = call_from_body(body)
        engine = self.engine
        t0 = time.perf_counter()
        return Job(lambda: _decided(engine.admit(call)),
                   lambda: _decided(engine.admit_failed(call, self.no_answer(), t0)))

    def admit_many(self, calls: list[Call], deadline_ms: int | None = None
                   ) -> list[Response]:
        """The answers of admits that arrived together (one store round trip)."""
        try:
            decisions = self.engine.admit_many(calls, deadline_ms)
        except Exception as e:  # never: the engine does not raise; a bug must not hang
            self.log.error("request_failed", path="/v1/admit", error=repr(e))
            return [_error(500, "internal error") for _ in calls]
        return [_decided(d) for d in decisions]

    def explain(self, body: bytes) -> Job:
        call = call_from_body(body)

        def run() -> Response:
            try:
                return Response(200, _dumps(self.engine.explain(call).as_dict()))
            except StoreError as e:
                return _error(503, f"store error: {e}")

        return Job(run, lambda: _error(503, f"store error: {self.no_answer()}"))

    def confirm(self, body: bytes) -> Response | Job:
        did = dialog_id_from_body(_object(body))
        return self._event(did, Op("confirm", did, self.engine.policy.timeouts.dialog_ms))

    def refresh(self, body: bytes) -> Response | Job:
        data = _object(body)
        did = dialog_id_from_body(data)
        timeout = data.get("timeout")
        if timeout is None:
            ms = self.engine.policy.timeouts.dialog_ms
        elif isinstance(timeout, int) and not isinstance(timeout, bool) and \
                0 < timeout <= 10 * 365 * 86400:
            ms = timeout * 1000
        else:
            raise BadRequest("'timeout' must be a positive number of seconds")
        return self._event(did, Op("refresh", did, ms))

    def release(self, body: bytes) -> Response | Job:
        data = _object(body)
        did = dialog_id_from_body(data)
        reason = _text(data, "reason") or "bye"
        if reason not in _END_REASONS:
            raise BadRequest(f"'reason' must be one of {', '.join(END_REASONS)}")
        return self._event(did, Op("release", did, reason), record=True)

    def _event(self, did: str, op: Op, record: bool = False) -> Response | Job:
        """Applied at once (200, ``ok``: the dialog was live) or queued in order while
        the store does not answer (202, ``queued``); an event the store has not
        answered within its timeout is answered as queued, and is applied or queued
        by the engine all the same. While the circuit is open it is queued here and
        now: the engine's tick and the admits probe the store, no event waits for a
        probe."""

        def answer(result: object) -> Response:
            out: dict[str, Any] = {"dialog_id": did, "ok": bool(result),
                                   "queued": result is None}
            if record:
                out["record"] = result.as_dict() if isinstance(result, CallRecord) else None
            return Response(202 if result is None else 200, _dumps(out))

        engine = self.engine
        if engine.breaker.open:
            engine._queue(op)
            return answer(None)
        return Job(lambda: answer(engine.apply_event(op)), lambda: answer(None),
                   skip_late=False)

    def settle(self, body: bytes) -> Response | Job:
        """A call the client decided by its own fallback, the service not answering: an
        admit body, ``admitted``, and the ``sent`` / ``timeout_ms`` of the admit it gave
        up on. Admitted: recorded (once, counted from now); rejected: that admit never
        counts, whenever it reaches the store. Answered as a dialog event."""
        data = _object(body)
        call = _call_of(data)
        admitted = data.get("admitted")
        if not isinstance(admitted, bool):
            raise BadRequest("'admitted' must be true or false")
        engine = self.engine
        did = dialog_id(call.call_id, call.from_tag)
        if admitted:
            op = Op("record", did, engine.store.deadline_ms(0), call=call, node=engine.node)
        else:
            deadline = client_deadline(data, engine)
            if deadline is None:
                raise BadRequest("a rejected call's settlement needs the 'sent' (and "
                                 "'timeout_ms') of its admit")
            op = Op("void", did, deadline)
        return self._event(did, op)

    def sync(self, body: bytes) -> Response | Job:
        """The client's own dialogs, when the store lost its state (the Kamailio http
        flavour's timer asks once a second). ``{}``: answers ``{"resync": true}`` when
        this node must put its calls back; a JSON-RPC ``dlg.list`` reply (``result``:
        Kamailio's dialogs, the call's attributes kept in ``$dlg_var(policer_call)``):
        puts them back (:meth:`Engine.resync`) and answers what it did."""
        data = _object(body)
        engine = self.engine
        if "result" not in data:
            return Response(200, _dumps({"resync": engine.resync_due, "node": engine.node}))
        from policer.reconcile import parse_dialogs

        dialogs = parse_dialogs(data["result"])

        def run() -> Response:
            report = engine.resync(dialogs)
            if report is None:
                return _error(503, "store error: the dialogs were not put back (sent again "
                                   "on the next ask)")
            return Response(200, _dumps({"resync": False, **report.as_dict()}))

        return Job(run, lambda: _error(503, f"store error: {self.no_answer()}"),
                   skip_late=False)

    def health(self) -> Job:
        return Job(self._health, lambda: self._unavailable(f"store error: {self.no_answer()}"))

    def _health(self) -> Response:
        engine = self.engine
        try:
            policy_hash = engine.store.loaded_hash()
        except StoreError as e:
            return self._unavailable(f"store error: {e}")
        except Exception as e:
            return self._unavailable(repr(e))
        return Response(200, _dumps({"status": "ok", "node": engine.node,
                                     "namespace": engine.policy.namespace,
                                     "policy_hash": policy_hash,
                                     "pending": len(engine.pending),
                                     "circuit_open": engine.breaker.open}))

    def _unavailable(self, error: str) -> Response:
        return Response(503, _dumps({"status": "unavailable", "node": self.engine.node,
                                     "error": error}))

    def metrics(self) -> Response | Job:
        """An operator's scrape: no deadline (each of its store reads is bounded by the
        store timeout, and a store that does not answer is reported as such)."""
        render = self._metrics
        if render is None:
            return _NOT_FOUND
        return Job(lambda: Response(200, render(), METRICS), None)


def _method_not_allowed(allowed: str) -> Response:
    return _error(405, f"method not allowed (use {allowed})")


# --------------------------------------------------------------------------- HTTP/1.1

#: Bytes of a request's line and headers at most, counted as they arrive (before the
#: head is whole, before any token is checked); more gets 431 and the connection closes.
MAX_HEAD = 16 * 1024
#: Bytes read from a connection at a time: the parser never takes more at once, so
#: what it holds of an unfinished head stays under 2 x MAX_HEAD whatever comes.
READ_SIZE = MAX_HEAD
#: Seconds a request may take to arrive whole (its line, headers and body) from its
#: first byte; a slower one gets 408 and the connection closes (``--head-timeout``).
HEAD_TIMEOUT_S = 10.0
#: A keep-alive connection idle this long (seconds) is closed (``--idle-timeout``).
IDLE_S = 75.0
#: Connections one worker holds at most (``--max-connections``); one more gets 503 and
#: is closed at once.
MAX_CONNECTIONS = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a worker holds its connections to (the command line sets them)."""

    max_connections: int = MAX_CONNECTIONS
    head_timeout: float = HEAD_TIMEOUT_S
    idle_timeout: float = IDLE_S

    @property
    def sweep_s(self) -> float:
        """How often the worker looks for late heads and idle connections."""
        return max(0.05, min(1.0, self.head_timeout / 4, self.idle_timeout / 4))

_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 401: b"Unauthorized",
            404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            413: b"Content Too Large", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented",
            503: b"Service Unavailable"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_TOO_LARGE = _error(431, f"request head over {MAX_HEAD} bytes", close=True)
_REFUSED = _error(503, "too many connections", close=True)
_CODING = _error(501, "Transfer-Encoding other than chunked alone is not supported",
                 close=True)


def _parse_error(reason: str) -> Response:
    """The answer to a request llhttp refused: 501 for a transfer coding it does not
    take (``chunked, gzip``, two Transfer-Encoding lines), else 400 with its reason."""
    if "Transfer-Encoding" in reason and "Content-Length" not in reason:
        return _CODING
    return _error(400, f"malformed HTTP request: {reason}", close=True)


def _head(status: int, content_type: bytes, length: int, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
        status, _REASONS.get(status, b"Unknown"), content_type, length,
        b"connection: close\r\n" if close else b"")


class _Slot:
    """An answer of one connection, in request order: ``data`` is None until decided.
    ``deadline``: an admit's client said when it stops waiting (the store's clock)."""

    __slots__ = ("close", "data", "deadline")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close
        self.deadline: int | None = None


#: Seconds between two attempts to open a worker's pipelined Redis connection.
PIPE_RETRY_S = 0.25
_CIRCUIT_OPEN = "circuit open: the store failed repeatedly"


def _earliest(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _no_reply(error: str) -> StoreError:
    """A store call given up on without its answer: it may have been, or yet be,
    applied (the engine settles a rejection by the fallback)."""
    e = StoreError(error)
    e.maybe_applied = True
    return e

_Target = tuple["HttpProtocol", _Slot]


class StoreCalls:
    """A worker's blocking store calls (dialog events, explain, health, /metrics, the
    admits its pipe cannot take), made one after another in a thread of the worker,
    in the order they came: the event loop never waits for Redis. An answer the store
    has not given within the policy's store timeout is given then by the request's
    ``late`` (the fallback decision, 202 queued, 503), so no client waits longer for
    a stalled store, however many requests wait with it."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policer-store")

    @property
    def timeout_s(self) -> float:
        return self.service.engine.policy.store_timeout_ms / 1000

    def job(self, protocol: HttpProtocol, slot: _Slot, job: Job, path: str,
            head: bool = False) -> None:
        """One request's job; ``head``: a HEAD request (the answer without its body)."""
        service = self.service

        def run() -> list[Response]:
            r = service.run(job, path)
            return [Response(r.status, b"", r.content_type, r.close) if head else r]

        late = job.late
        self.submit([(protocol, slot)], run, None if late is None else lambda: [late()],
                    job.skip_late)

    def submit(self, targets: list[_Target], run: Callable[[], list[Response]],
               late: Callable[[], list[Response]] | None, skip_late: bool = True) -> None:
        """``run()`` in the store thread answers ``targets`` (one response each), or
        ``late()`` in the loop does once the store timeout has passed."""
        loop = self.loop
        state = _Pending()

        def work() -> list[Response] | None:
            if state.done and skip_late:
                return None  # answered already: the store is not asked
            return run()

        def finish(fut: asyncio.Future[list[Response] | None]) -> None:
            if state.done or fut.cancelled():
                return
            state.done = True
            if state.timer is not None:
                state.timer.cancel()
            try:
                responses = fut.result()
            except Exception as e:  # defensive: run() does not raise
                self.service.log.error("request_failed", error=repr(e))
                responses = [_error(500, "internal error") for _ in targets]
            if responses is not None:
                _answer_all(targets, responses)

        def expire() -> None:
            if state.done:
                return
            state.done = True
            try:
                responses = cast(Callable[[], list[Response]], late)()
            except Exception as e:  # defensive: never a dropped answer
                self.service.log.error("request_failed", error=repr(e))
                responses = [_error(500, "internal error") for _ in targets]
            _answer_all(targets, responses)

        try:
            fut = loop.run_in_executor(self.pool, work)
        except RuntimeError:  # the worker is stopping
            _answer_all(targets, [_error(503, "stopping") for _ in targets])
            return
        if late is not None:
            state.timer = loop.call_later(self.timeout_s, expire)
        fut.add_done_callback(finish)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Pending:
    __slots__ = ("done", "timer")

    def __init__(self) -> None:
        self.done = False  # answered (by the store or late)
        self.timer: asyncio.TimerHandle | None = None


def _answer_all(targets: list[_Target], responses: list[Response]) -> None:
    for (protocol, slot), response in zip(targets, responses, strict=True):
        _fill(protocol, slot, response)


class Admits:
    """A worker's admits: each ``POST /v1/admit`` is sent to Redis from the event loop
    on a connection of the worker's own (the pipe), without waiting for the answer, so
    a worker keeps several calls in flight while Redis works and reads the next
    requests meanwhile. Every admit read in one turn of the loop goes out in one write
    (Redis reads them together, answers them together); replies come back in order and
    each is answered as soon as its reply is read.

    Decided by the engine as :meth:`Engine.admit` does (the same arguments, decision,
    log, metrics, circuit breaker). No admit waits longer than the policy's store
    timeout: a reply later than that, or a lost connection, gives every call in flight
    the ``on_store_error`` decision; while the circuit is open, or the pipe is down
    and not being opened, the fallback decides at once; while it is being opened (in a
    thread, every :data:`PIPE_RETRY_S` at most) admits wait for it up to the store
    timeout. A reply that is an error is decided again by :meth:`Engine.admit` (which
    loads the library when Redis lost it) in the store thread. A TLS or Cluster URL
    has no pipe: the admits of a turn go to the store thread together
    (:meth:`Engine.admit_many`, one round trip), bounded by the store timeout too."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop,
                 store: StoreCalls | None = None) -> None:
        self.service = service
        self.engine = service.engine
        self.loop = loop
        self.store = store if store is not None else StoreCalls(service, loop)
        self.calls: list[Call] = []
        self.waiting: list[tuple[HttpProtocol, _Slot, float]] = []
        self.held: collections.deque[tuple[HttpProtocol, _Slot, Call, float]] = \
            collections.deque()  # waiting for the pipe being opened
        self.pipe: _RedisPipe | None = None
        self._opening = False
        self._blocking = False  # no pipe for this store (TLS, Cluster)
        self._next_open = 0.0  # monotonic time of the next attempt to open the pipe
        self._why = "ConnectionError: no connection to the store yet"
        self._timer: asyncio.TimerHandle | None = None  # replies in flight checked
        self._held_timer: asyncio.TimerHandle | None = None
        self._opener = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="policer-pipe")

    @property
    def timeout_s(self) -> float:
        """How long a reply may take: the (current) policy's store timeout."""
        return self.engine.policy.store_timeout_ms / 1000

    def start(self) -> None:
        """Open the pipe before the first admit needs it."""
        self._open()

    def add(self, protocol: HttpProtocol, slot: _Slot, call: Call) -> None:
        if not self.calls:
            self.loop.call_soon(self.flush)
        self.calls.append(call)
        self.waiting.append((protocol, slot, time.perf_counter()))

    def flush(self) -> None:
        calls, waiting = self.calls, self.waiting
        self.calls, self.waiting = [], []
        if calls:
            self._dispatch(calls, waiting)

    def _dispatch(self, calls: list[Call],
                  waiting: list[tuple[HttpProtocol, _Slot, float]]) -> None:
        pipe = self.pipe
        if pipe is not None and pipe.transport is not None:
            self._send(pipe, calls, waiting)
        elif self._blocking:
            self._by_store(calls, waiting)
        else:
            self._open()
            if self._opening and not self.engine.breaker.open:
                for (protocol, slot, t0), call in zip(waiting, calls, strict=True):
                    self.held.append((protocol, slot, call, t0))
                self._arm_held()
            else:
                self._fallback(calls, waiting, None if self.engine.breaker.open else self._why)

    def _send(self, pipe: _RedisPipe, calls: list[Call],
              waiting: list[tuple[HttpProtocol, _Slot, float]]) -> None:
        engine = self.engine
        if not engine.breaker.allow():  # the circuit is open and no probe is due
            self._fallback(calls, waiting, None)
            return
        command = cast(Any, engine.store).admit_command
        # each admit carries when this worker stops waiting for it (the store's clock):
        # a request Redis reads later than that (paused, slow) writes nothing
        now = time.perf_counter()
        deadlines = [_earliest(slot.deadline, engine.store.deadline_ms(
                         max(0, round((t0 + self.timeout_s - now) * 1000))))
                     for _, slot, t0 in waiting]
        try:
            data = b"".join([command(call, engine.node, deadline)
                             for call, deadline in zip(calls, deadlines, strict=True)])
        except Exception as e:  # defensive: never a dropped call
            for (protocol, slot, t0), call in zip(waiting, calls, strict=True):
                _fill(protocol, slot, _decided(engine.admit_failed(call, f"admit: {e!r}", t0)))
            return
        inflight = pipe.inflight
        for (protocol, slot, t0), call, deadline in zip(waiting, calls, deadlines,
                                                        strict=True):
            inflight.append((protocol, slot, call, t0, deadline))
        cast(asyncio.Transport, pipe.transport).write(data)
        if self._timer is None:
            self._check()

    def _fallback(self, calls: list[Call], waiting: list[tuple[HttpProtocol, _Slot, float]],
                  error: str | None) -> None:
        """The ``on_store_error`` decision at once: the store is not asked. ``error``:
        why (one failure of the store for the circuit breaker); None: the circuit is
        open (as :meth:`Engine.admit` decides then)."""
        engine = self.engine
        for i, ((protocol, slot, t0), call) in enumerate(zip(waiting, calls, strict=True)):
            if error is None:
                d = engine._fallback(call, _CIRCUIT_OPEN, t0)
            elif i == 0:
                d = engine.admit_failed(call, error, t0)
            else:
                d = engine._fallback(call, error, t0)
            _fill(protocol, slot, _decided(d))

    def _by_store(self, calls: list[Call],
                  waiting: list[tuple[HttpProtocol, _Slot, float]]) -> None:
        """A store with no pipe: the admits in the store thread, one round trip."""
        engine = self.engine
        t0s = [t0 for _, _, t0 in waiting]
        deadline = engine.store.deadline_ms()

        def late() -> list[Response]:
            why = _no_reply(self.service.no_answer())
            return [_decided(engine.admit_failed(call, why, t0, deadline))
                    for call, t0 in zip(calls, t0s, strict=True)]

        self.store.submit([(p, slot) for p, slot, _ in waiting],
                          lambda: self.service.admit_many(calls, deadline), late)

    # -- admits waiting for the pipe being opened
    def _arm_held(self) -> None:
        if self._held_timer is None and self.held:
            wait = self.held[0][3] + self.timeout_s - time.perf_counter()
            self._held_timer = self.loop.call_later(max(0.0, wait), self._expire_held)

    def _expire_held(self) -> None:
        self._held_timer = None
        now = time.perf_counter()
        timeout = self.timeout_s
        late: list[tuple[HttpProtocol, _Slot, Call, float]] = []
        while self.held and self.held[0][3] + timeout <= now + 0.001:
            late.append(self.held.popleft())
        if late:
            self._fallback([c for _, _, c, _ in late], [(p, s, t) for p, s, _, t in late],
                           f"TimeoutError: no connection to the store in "
                           f"{timeout * 1000:.0f} ms")
        self._arm_held()

    def _release_held(self) -> None:
        """The pipe opened, or the attempt failed: the admits that waited for it go."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self.held = list(self.held), collections.deque()
        if held:
            self._dispatch([c for _, _, c, _ in held], [(p, s, t) for p, s, _, t in held])

    # -- the worker's own connection
    def _open(self) -> None:
        """Start opening the pipe in a thread (connect, AUTH, SELECT: blocking calls),
        unless it is open, being opened, or was tried less than PIPE_RETRY_S ago."""
        if self.pipe is not None or self._opening or self._blocking:
            return
        make = getattr(self.engine.store, "pipeline_socket", None)
        if make is None:
            self._blocking = True
            return
        now = time.monotonic()
        if now < self._next_open:
            return
        self._next_open = now + PIPE_RETRY_S
        try:
            fut = self.loop.run_in_executor(self._opener, make)
        except RuntimeError:  # the worker is stopping
            return
        self._opening = True
        fut.add_done_callback(self._opened)

    def _opened(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self._opening = False
            return
        try:
            sock = fut.result()
        except Exception as e:  # Redis down or stalled: the fallback decides meanwhile
            self._opening = False
            self._why = str(e) if isinstance(e, StoreError) else f"ConnectionError: {e!r}"
            self._release_held()
            return
        if sock is None:  # TLS, Cluster: always the store thread
            self._opening = False
            self._blocking = True
            self._release_held()
            return
        sock.setblocking(False)
        self.loop.create_task(self._connect(sock))

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.create_connection(lambda: _RedisPipe(self), sock=sock)
        except Exception as e:
            sock.close()
            self._why = f"ConnectionError: {e!r}"
        finally:
            self._opening = False
            self._release_held()

    def reply(self, pipe: _RedisPipe, reply: Any) -> None:
        protocol, slot, call, t0, _ = pipe.inflight.popleft()
        engine = self.engine
        if isinstance(reply, Exception):
            err = store_error(reply)
            if err.late or "POLICER recovering" in str(err):
                # written nothing: the fallback decides (a late admit was given up on)
                _fill(protocol, slot, _decided(engine.admit_failed(call, err, t0)))
                return
            # another error reply: decided as admit() does, away from the loop (it may
            # load the library)
            self.store.submit(
                [(protocol, slot)], lambda: [_decided(engine.admit(call))],
                lambda: [_decided(engine.admit_failed(
                    call, _no_reply(self.service.no_answer()), t0))])
            return
        try:
            d = engine.admit_reply(call, call_result(reply), t0)
        except Exception as e:  # defensive: never a dropped call
            d = engine.admit_failed(call, f"admit: {e!r}", t0)
        _fill(protocol, slot, _decided(d))

    def lost(self, pipe: _RedisPipe, error: str) -> None:
        """The connection broke or a reply is late: every call in flight gets the
        fallback decision; a new connection is opened (in the background)."""
        if self.pipe is pipe:
            self.pipe = None
        if pipe.transport is not None:
            pipe.transport.abort()
            pipe.transport = None
        self._why = error
        inflight, pipe.inflight = pipe.inflight, collections.deque()
        given_up = _no_reply(error)  # the requests may still be applied (or were)
        for protocol, slot, call, t0, deadline in inflight:
            _fill(protocol, slot, _decided(self.engine.admit_failed(call, given_up, t0,
                                                                    deadline)))
        self._open()

    def _check(self) -> None:
        """The oldest call in flight answered in time, or all of them given up."""
        self._timer = None
        pipe = self.pipe
        if pipe is None or not pipe.inflight:
            return
        late = pipe.inflight[0][3] + self.timeout_s - time.perf_counter()
        if late <= 0:
            self.lost(pipe, f"TimeoutError: no reply in {self.timeout_s * 1000:.0f} ms")
        else:
            self._timer = self.loop.call_later(late, self._check)

    def close(self) -> None:
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.close()
        self._opener.shutdown(wait=False, cancel_futures=True)
        self.store.close()


class _RedisPipe(asyncio.Protocol):
    """The worker's own Redis connection: replies parsed by hiredis, in order."""

    def __init__(self, admits: Admits) -> None:
        self.admits = admits
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        #: (protocol, slot, call, when received, its request's deadline in Redis's clock)
        self.inflight: collections.deque[tuple[HttpProtocol, _Slot, Call, float, int]] = \
            collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.admits.pipe = self

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        reply = self.admits.reply
        try:
            while self.inflight:
                r = reader.gets()
                if r is False:
                    return
                reply(self, r)
        except hiredis.ProtocolError as e:
            self.admits.lost(self, f"ProtocolError: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.admits.lost(self, f"ConnectionError: {exc or 'connection closed by Redis'}")


def _decided(d: Any) -> Response:
    return Response(200, _dumps(d.as_dict()))


def _fill(protocol: HttpProtocol, slot: _Slot, response: Response) -> None:
    if slot.data is not None:  # answered already
        return
    slot.close = slot.close or response.close
    slot.data = _head(response.status, response.content_type, len(response.body),
                      slot.close) + response.body
    protocol.drain()


class _Worker:
    """What the connections of one worker share: the service, the admits' pipe, the
    set of open connections, and one read buffer (a read is parsed before the next
    one is made, so one buffer serves them all)."""

    def __init__(self, service: Service, admits: Admits, limits: Limits = Limits()) -> None:
        self.service = service
        self.admits = admits
        self.store = admits.store
        self.limits = limits
        self.connections: set[HttpProtocol] = set()
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.refused = 0  # connections refused since the last sweep

    def sweep(self) -> None:
        """Close what overstayed: a request not whole in time (408), an idle
        connection, a closing one whose client does not read its last answer."""
        now = time.monotonic()
        limits = self.limits
        for c in list(self.connections):
            c.sweep(now, limits)
        if self.refused:
            self.service.log.warning("connections_refused", count=self.refused,
                                     max_connections=limits.max_connections)
            self.refused = 0


class HttpProtocol(asyncio.BufferedProtocol):
    """HTTP/1.1 on one connection: httptools' parser (llhttp, C) calls back here and
    each request is answered at once, in order, as its bytes are read (keep-alive,
    pipelining, chunked bodies, ``Expect: 100-continue``). No ASGI layer, no task per
    request: the answer is one ``write``. Bounds: :data:`MAX_HEAD` (431), counted as
    the bytes arrive, :data:`MAX_BODY` (413), reads of :data:`READ_SIZE`; a malformed
    request gets 400; each answer ends the connection when the client asked so
    (``Connection: close``, HTTP/1.0)."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.service = worker.service
        self.connections = worker.connections
        self.admits = worker.admits
        self.store = worker.store
        self._slots: collections.deque[_Slot] = collections.deque()  # answers in order
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.last = 0.0  # monotonic time of the last request (idle connections close)
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0  # body bytes so far
        self._head = 0  # head bytes the parser handed back so far (URL, whole headers)
        self._in_head = True  # the next bytes are a head's (its headers not all read)
        self._fed = 0  # bytes of the current head fed to the parser so far
        self._begun = 0.0  # monotonic time of the current request's first byte (0: none)
        self._closed_at = 0.0  # monotonic time the sweep first saw it closing
        self._auth: bytes | None = None
        self._error: Response | None = None  # answered as soon as the head is read
        self._continue = False  # the client waits for "100 Continue" before its body
        self._chunked = False  # a Transfer-Encoding was read
        self._closing = False

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.last = time.monotonic()
        worker = self.worker
        if len(self.connections) >= worker.limits.max_connections:  # refused, not queued
            worker.refused += 1
            self._closing = True
            t.write(_head(503, JSON, len(_REFUSED.body), True) + _REFUSED.body)
            t.close()
            return
        self.connections.add(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.worker.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        try:
            self._feed(self.worker.buffer[:nbytes])
        except httptools.HttpParserUpgrade:
            self._answer(_error(400, "protocol upgrade not supported", close=True), True)
        except httptools.HttpParserError as e:
            cause = e.__context__  # what a callback raised (httptools keeps it there)
            if cause is not None and not isinstance(cause, httptools.HttpParserError):
                self._failed(cause)  # a bug here, not the client's bytes
            elif not self._closing:
                self._answer(self._error or _parse_error(str(e)), True)
        except Exception as e:  # a bug must never become a traceback or a hang
            self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self.service.log.error("request_failed", error=repr(e))
        self._answer(_error(500, "internal error", close=True), True)

    def _feed(self, data: memoryview) -> None:
        """Parse ``data``, counting a head's bytes as they arrive: a head still not whole
        after MAX_HEAD bytes gets 431 however its bytes came (one header line without an
        end included), before the parser holds more of it."""
        parser = self.parser
        while data:
            if not self._in_head:  # a body, then maybe the start of the next head
                parser.feed_data(data)
                break
            room = MAX_HEAD - self._fed
            piece = data if len(data) <= room else data[:room]
            self._fed += len(piece)
            parser.feed_data(piece)
            if self._closing:
                return
            data = data[len(piece):]
            if self._in_head and self._fed >= MAX_HEAD:
                break
        if self._in_head and self._fed >= MAX_HEAD and not self._closing:
            self._answer(_HEAD_TOO_LARGE, True)

    def pause_writing(self) -> None:  # the client does not read: stop reading it
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._in_head = True
        self._begun = time.monotonic()
        self._url = b""
        self._body = []
        self._size = self._head = 0
        self._auth = None
        self._error = None
        self._continue = False
        self._chunked = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        n = name.lower()
        if n == b"authorization":
            self._auth = value
        elif n == b"content-length":  # llhttp refused all but digits and white space
            digits = value.strip(b" \t")
            if not digits.isdigit():
                self._error = _error(400, "bad Content-Length", close=True)
            elif int(digits) > self._max_body():
                self._error = _TOO_LARGE
        elif n == b"expect" and value.lower() == b"100-continue":
            self._continue = True
        elif n == b"transfer-encoding":  # no decoder here but chunked (llhttp's own)
            if self._chunked or value.strip(b" \t").lower() != b"chunked":
                self._error = _CODING
            self._chunked = True

    def _max_body(self) -> int:
        """A body's bound: :data:`MAX_BODY`, :data:`SYNC_MAX_BODY` for a proxy's dialog
        list (only from a client with the token: checked before its body is read)."""
        return SYNC_MAX_BODY if self._url == b"/v1/sync" else MAX_BODY

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._error is not None:
            self._abort(self._error)
        elif self._url == b"/v1/sync" and not self.service.authorized(self._auth):
            self._abort(_UNAUTHORIZED)
        elif self._continue and self.transport is not None:
            # the body is asked for only from a client with the token
            if not self.service.authorized(self._auth):
                self._abort(_UNAUTHORIZED)
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body():
            self._abort(_TOO_LARGE)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True  # the next bytes start the next request
        self._fed = 0
        self._begun = 0.0
        if self._closing:
            return
        self.last = time.monotonic()
        keep = self.parser.should_keep_alive()
        service = self.service
        admits = self.admits
        if self._url == b"/v1/admit" and self.parser.get_method() == b"POST" and \
                service.authorized(self._auth):
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            try:
                data = _object(body)
                call = _call_of(data)
                deadline = client_deadline(data, service.engine)
            except BadRequest as e:
                self._answer(_error(400, str(e)), not keep)
                return
            except Exception as e:  # as Service.route: never a traceback
                service.log.error("request_failed", path="/v1/admit", error=repr(e))
                self._answer(_error(500, "internal error"), not keep)
                return
            slot = self._slot(keep)
            slot.deadline = deadline
            admits.add(self, slot, call)
            return
        if not service.authorized(self._auth):
            self._answer(_UNAUTHORIZED, True)
            return
        url = self._url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        method = self.parser.get_method().decode("latin-1")
        r = service.route(method, path, body)
        if isinstance(r, Job):  # it asks the store: in the store thread
            self.store.job(self, self._slot(keep), r, path, head=method == "HEAD")
            return
        if method == "HEAD":
            r = Response(r.status, b"", r.content_type, r.close)
        self._answer(r, not keep or r.close)

    def _slot(self, keep: bool) -> _Slot:
        """The place of an answer still to come, in request order."""
        slot = _Slot(None, not keep)
        self._slots.append(slot)
        if not keep:
            self._closing = True  # closed once this answer is written
        return slot

    # -- answering
    def _grow(self, n: int) -> None:
        self._head += n
        if self._head > MAX_HEAD:
            self._abort(_HEAD_TOO_LARGE)

    def _abort(self, response: Response) -> None:
        """Answer now and close: the rest of the request is not read."""
        self._answer(response, True)
        raise httptools.HttpParserCallbackError("aborted")

    def _answer(self, response: Response, close: bool) -> None:
        t = self.transport
        if t is None or self._closing:
            return
        body = response.body
        data = _head(response.status, response.content_type, len(body), close) + body
        if self._slots:  # an earlier admit is still waiting: answer after it
            self._slots.append(_Slot(data, close))
            if close:
                self._closing = True
            return
        t.write(data)
        if close:
            self._closing = True
            t.close()

    def drain(self) -> None:
        """Write the answers that are decided, in request order."""
        slots = self._slots
        t = self.transport
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            if t is None:
                continue
            t.write(cast(bytes, slot.data))
            if slot.close:
                slots.clear()
                t.close()
                return

    def sweep(self, now: float, limits: Limits) -> None:
        t = self.transport
        if t is None:
            return
        if self._closing:  # its last answer is being written: a client that does not
            if not self._closed_at:  # read it keeps the connection no longer than this
                self._closed_at = now
            elif now - self._closed_at > limits.head_timeout:
                t.abort()
        elif self._begun and now - self._begun > limits.head_timeout:
            self._answer(_error(408, f"request not read whole in {limits.head_timeout:g} s",
                                close=True), True)
        elif not self._slots and not self._begun and now - self.last > limits.idle_timeout:
            self._closing = True
            t.close()


def serve_forever(service: Service, sock: socket.socket, limits: Limits = Limits()) -> None:
    """One worker: an event loop (uvloop) serving ``sock`` with :class:`HttpProtocol`
    and the engine's tick, until SIGTERM/SIGINT."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    admits = Admits(service, loop, StoreCalls(service, loop))
    worker = _Worker(service, admits, limits)
    connections = worker.connections
    ticker = _Ticker(service.engine)
    stop = asyncio.Event()

    def sweep() -> None:
        worker.sweep()
        loop.call_later(limits.sweep_s, sweep)

    async def main() -> None:
        server = await loop.create_server(lambda: HttpProtocol(worker),
                                          sock=sock, backlog=1024)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(limits.sweep_s, sweep)
        admits.start()
        ticker.start()
        try:
            await stop.wait()
        finally:
            server.close()
            admits.close()
            for c in list(connections):
                if c.transport is not None:
                    c.transport.close()
            ticker.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


# --------------------------------------------------------------------------- running


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    """The bearer token in ``path`` (its first line, without white space)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ServeError(f"--token-file {path}: {e.strerror or e}") from None
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise ServeError(f"--token-file {path}: expected one token (printable, no spaces)")
    return token


def check_listener(host: str, token: str | None, insecure: bool) -> None:
    """Refuse a listener beyond loopback that anyone could use."""
    if token is None and not insecure and not is_loopback(host):
        raise ServeError(
            f"--listen {host}: not a loopback address; give --token-file (clients then "
            "send 'Authorization: Bearer TOKEN') or --insecure to serve anyone who can "
            "reach it")


class _Ticker:
    """The engine's tick, once a second, in a thread of the worker (its store calls
    wait outside the event loop; the engine is thread-safe)."""

    def __init__(self, engine: Engine, interval: float = TICK_S) -> None:
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="policer-tick", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.engine.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _metrics_renderer(engine: Engine) -> Callable[[], bytes]:
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


def bind(host: str, port: int, listen: bool = True) -> socket.socket:
    """The service's socket, bound (an address in use fails here, before anything else
    is done) and, with ``listen``, listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    sock.set_inheritable(True)
    return sock


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


def run(engine: Engine, host: str, port: int, workers: int = 1,
        token: str | None = None, limits: Limits = Limits()) -> int:
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
    render = _metrics_renderer(engine)
    service = Service(engine, token, render)
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

