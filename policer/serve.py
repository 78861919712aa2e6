"""``policer serve``: the decision service, for SIP cores that cannot import Python
(FreeSWITCH, Asterisk, OpenSIPS, SBCs, B2BUAs) but can make an HTTP request per call.

HTTP/1.1 with keep-alive on uvicorn (httptools parser, uvloop), a raw ASGI app with
no framework between the socket and :class:`Service` (the stack was chosen by
measurement: ``benchmarks/serve.py``, ``docs/benchmarks.md``, "Decision service").

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

Each worker process runs one engine on the blocking store client inside its event
loop: a decision is one Redis round trip with no thread hop, as in a proxy's own
worker; ``--workers`` processes share one listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
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

import httptools
import orjson

from policer.call import Call
from policer.log import get_logger
from policer.store import Op, StoreError
from policer.store.base import END_REASONS, CallRecord
from policer.store.keys import dialog_id

if TYPE_CHECKING:  # imported by the caller, after prepare_metrics (prometheus-client)
    from policer.engine import Engine

__all__ = [
    "MAX_BODY",
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
    """JSON of an answer. SIP values may hold bytes that are not UTF-8 (kept as
    surrogate escapes): orjson refuses those, the standard library escapes them as
    ``policer admit --json`` does."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, default=str).encode()


def _loads(body: bytes) -> Any:
    """The request's JSON. orjson first; JSON text with a lone surrogate escape
    (``"\\ud800"``, valid JSON that orjson refuses) is read by the standard library,
    whose str keeps it (the engine's Call handles such strings)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"malformed JSON: {e}") from None


def _error(status: int, message: str, close: bool = False) -> Response:
    return Response(status, _dumps({"error": message}), close=close)


_NOT_FOUND = _error(404, "not found")
_UNAUTHORIZED = _error(401, "missing or wrong bearer token")
_TOO_LARGE = _error(413, f"request body over {MAX_BODY} bytes", close=True)


def _text(body: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise BadRequest(f"{name!r} is required")
        return None
    if not isinstance(v, str):
        raise BadRequest(f"{name!r} must be a string")
    return v


def _object(body: bytes) -> dict[str, Any]:
    data = _loads(body)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def call_from_body(body: bytes) -> Call:
    """The :class:`Call` of an admit (or explain) body; raises BadRequest."""
    data = _object(body)
    call_id = _text(data, "call_id", True)
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
        return dialog_id(_text(data, "call_id", True), _text(data, "from_tag", True))
    did = _text(data, "dialog_id", True)
    assert did is not None
    if len(did) > MAX_DIALOG_ID or not _DIALOG_ID.fullmatch(did):
        raise BadRequest("'dialog_id' is not a dialog id policer gave")
    return did


class Service:
    """The routes, over one engine; no HTTP server in here (the server adapter reads
    the request and writes the :class:`Response`). Never raises."""

    def __init__(self, engine: Engine, token: str | None = None,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.engine = engine
        self._token = f"Bearer {token}".encode() if token else None
        self._metrics = metrics
        self.log = get_logger("policer.serve")
        self._post: dict[str, Callable[[bytes], Response]] = {
            "/v1/admit": self.admit,
            "/v1/explain": self.explain,
            "/v1/confirm": self.confirm,
            "/v1/refresh": self.refresh,
            "/v1/release": self.release,
        }
        self._get: dict[str, Callable[[], Response]] = {
            "/v1/health": self.health,
            "/metrics": self.metrics,
        }

    def authorized(self, authorization: bytes | None) -> bool:
        if self._token is None:
            return True
        return authorization is not None and hmac.compare_digest(authorization, self._token)

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """One request whose credentials were checked (:meth:`authorized`)."""
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

    # -- routes
    def admit(self, body: bytes) -> Response:
        return Response(200, _dumps(self.engine.admit(call_from_body(body)).as_dict()))

    def explain(self, body: bytes) -> Response:
        call = call_from_body(body)
        try:
            return Response(200, _dumps(self.engine.explain(call).as_dict()))
        except StoreError as e:
            return _error(503, f"store error: {e}")

    def confirm(self, body: bytes) -> Response:
        did = dialog_id_from_body(_object(body))
        return self._event(did, Op("confirm", did, self.engine.policy.timeouts.dialog_ms))

    def refresh(self, body: bytes) -> Response:
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

    def release(self, body: bytes) -> Response:
        data = _object(body)
        did = dialog_id_from_body(data)
        reason = _text(data, "reason") or "bye"
        if reason not in _END_REASONS:
            raise BadRequest(f"'reason' must be one of {', '.join(END_REASONS)}")
        return self._event(did, Op("release", did, reason), record=True)

    def _event(self, did: str, op: Op, record: bool = False) -> Response:
        result = self.engine.apply_event(op)
        out: dict[str, Any] = {"dialog_id": did, "ok": bool(result), "queued": result is None}
        if record:
            out["record"] = result.as_dict() if isinstance(result, CallRecord) else None
        return Response(202 if result is None else 200, _dumps(out))

    def health(self) -> Response:
        engine = self.engine
        try:
            policy_hash = engine.store.loaded_hash()
        except StoreError as e:
            return Response(503, _dumps({"status": "unavailable", "node": engine.node,
                                         "error": f"store error: {e}"}))
        except Exception as e:
            return Response(503, _dumps({"status": "unavailable", "node": engine.node,
                                         "error": repr(e)}))
        return Response(200, _dumps({"status": "ok", "node": engine.node,
                                     "namespace": engine.policy.namespace,
                                     "policy_hash": policy_hash,
                                     "pending": len(engine.pending),
                                     "circuit_open": engine.breaker.open}))

    def metrics(self) -> Response:
        if self._metrics is None:
            return _NOT_FOUND
        return Response(200, self._metrics(), METRICS)


def _method_not_allowed(allowed: str) -> Response:
    return _error(405, f"method not allowed (use {allowed})")


# --------------------------------------------------------------------------- HTTP/1.1

#: Bytes of a request's line and headers at most; more gets 431 and the connection closes.
MAX_HEAD = 16 * 1024
#: A keep-alive connection idle this long (seconds) is closed.
IDLE_S = 75.0

_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 401: b"Unauthorized",
            404: b"Not Found", 405: b"Method Not Allowed", 413: b"Content Too Large",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
            503: b"Service Unavailable"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _head(status: int, content_type: bytes, length: int, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
        status, _REASONS.get(status, b"Unknown"), content_type, length,
        b"connection: close\r\n" if close else b"")


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 on one connection: httptools' parser (llhttp, C) calls back here and
    each request is answered at once, in order, inside ``data_received`` (keep-alive,
    pipelining, chunked bodies, ``Expect: 100-continue``). No ASGI layer, no task per
    request: the answer is one ``write``. Bounds: :data:`MAX_HEAD` (431),
    :data:`MAX_BODY` (413); a malformed request gets 400; each answer ends the
    connection when the client asked so (``Connection: close``, HTTP/1.0)."""

    def __init__(self, service: Service, connections: set[HttpProtocol]) -> None:
        self.service = service
        self.connections = connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.last = 0.0  # monotonic time of the last request (idle connections close)
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0  # body bytes so far
        self._head = 0  # head bytes so far
        self._auth: bytes | None = None
        self._error: Response | None = None  # answered as soon as the head is read
        self._continue = False  # the client waits for "100 Continue" before its body
        self._closing = False

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.last = time.monotonic()
        self.connections.add(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._answer(_error(400, "protocol upgrade not supported", close=True), True)
        except httptools.HttpParserError as e:
            if not self._closing:
                self._answer(_error(400, f"malformed HTTP request: {e}", close=True), True)

    def pause_writing(self) -> None:  # the client does not read: stop reading it
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._size = self._head = 0
        self._auth = None
        self._error = None
        self._continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        n = name.lower()
        if n == b"authorization":
            self._auth = value
        elif n == b"content-length":
            if not value.isdigit() or int(value) > MAX_BODY:
                self._error = _TOO_LARGE if value.isdigit() else _error(
                    400, "bad Content-Length", close=True)
        elif n == b"expect" and value.lower() == b"100-continue":
            self._continue = True

    def on_headers_complete(self) -> None:
        if self._error is not None:
            self._abort(self._error)
        elif self._continue and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY:
            self._abort(_TOO_LARGE)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self.last = time.monotonic()
        keep = self.parser.should_keep_alive()
        service = self.service
        if not service.authorized(self._auth):
            response = _UNAUTHORIZED
        else:
            url = self._url
            q = url.find(b"?")
            path = (url if q < 0 else url[:q]).decode("latin-1")
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            method = self.parser.get_method().decode("latin-1")
            response = service.handle(method, path, body)
            if method == "HEAD":
                response = Response(response.status, b"", response.content_type,
                                    response.close)
        self._answer(response, not keep or response.close)

    # -- answering
    def _grow(self, n: int) -> None:
        self._head += n
        if self._head > MAX_HEAD:
            self._abort(_error(431, f"request head over {MAX_HEAD} bytes", close=True))

    def _abort(self, response: Response) -> None:
        """Answer now and close: the rest of the request is not read."""
        self._answer(response, True)
        raise httptools.HttpParserCallbackError("aborted")

    def _answer(self, response: Response, close: bool) -> None:
        t = self.transport
        if t is None or self._closing:
            return
        body = response.body
        t.write(_head(response.status, response.content_type, len(body), close) + body)
        if close:
            self._closing = True
            t.close()

    def close_if_idle(self, now: float) -> None:
        if self.transport is not None and now - self.last > IDLE_S:
            self._closing = True
            self.transport.close()


def serve_forever(service: Service, sock: socket.socket) -> None:
    """One worker: an event loop (uvloop) serving ``sock`` with :class:`HttpProtocol`
    and the engine's tick, until SIGTERM/SIGINT."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    connections: set[HttpProtocol] = set()
    ticker = _Ticker(service.engine)
    stop = asyncio.Event()

    def sweep() -> None:
        now = time.monotonic()
        for c in list(connections):
            c.close_if_idle(now)
        loop.call_later(IDLE_S / 5, sweep)

    async def main() -> None:
        server = await loop.create_server(lambda: HttpProtocol(service, connections),
                                          sock=sock, backlog=1024)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(IDLE_S / 5, sweep)
        ticker.start()
        try:
            await stop.wait()
        finally:
            server.close()
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


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
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
        token: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT. The node starts once (its dialogs from an earlier
    run end, it takes its lease), then ``workers`` processes fork from here and share
    the listening socket; each keeps the engine's tick going."""
    log = get_logger("policer.serve")
    sock = bind(host, port)
    engine.start()
    render = _metrics_renderer(engine)
    service = Service(engine, token, render)
    log.info("serve_listening", listen=f"{host}:{sock.getsockname()[1]}", workers=workers,
             node=engine.node, namespace=engine.policy.namespace, token=token is not None)
    if workers <= 1:
        serve_forever(service, sock)
        return 0
    return _supervise(service, sock, workers, log)


def _supervise(service: Service, sock: socket.socket, workers: int, log: Any) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                serve_forever(service, sock)
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

