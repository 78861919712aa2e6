"""HTTP/1.1 as a worker serves it: an :class:`asyncio.BufferedProtocol` per connection
on httptools' parser (llhttp, C), no framework and no ASGI layer between the socket
and the :class:`~policer.serve.service.Service`. Keep-alive, pipelining, chunked
bodies, ``Expect: 100-continue``; answers in request order, each one ``write``.

What a client can make it hold or wait for is bounded before any token is checked
(docs/security.md): a request's head (:data:`MAX_HEAD`, counted as it arrives) and
body (:data:`MAX_BODY`), the time a request may take to arrive (``--head-timeout``),
idle connections (``--idle-timeout``) and the connections of a worker
(``--max-connections``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import cast

import httptools

from policer.serve.admits import Admits
from policer.serve.bodies import BadRequest, admit_of
from policer.serve.service import JSON, Job, Response, Service, error
from policer.serve.store_thread import StoreThread

__all__ = [
    "DEFAULT_LIMITS",
    "HEAD_TIMEOUT_S",
    "IDLE_S",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "SYNC_MAX_BODY",
    "TOO_LARGE",
    "UNAUTHORIZED",
    "HttpProtocol",
    "HttpServer",
    "Limits",
]

#: Largest request body accepted (bytes); larger ones get 413.
MAX_BODY = 64 * 1024
#: Largest body of ``POST /v1/sync`` (a proxy's dialog list, about 1.5 KB a dialog).
SYNC_MAX_BODY = 16 * 1024 * 1024
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


#: The command line's defaults.
DEFAULT_LIMITS = Limits()


#: A client without the token gets one answer per connection.
UNAUTHORIZED = error(401, "missing or wrong bearer token", close=True)
TOO_LARGE = error(413, f"request body over {MAX_BODY} bytes ({SYNC_MAX_BODY} for /v1/sync)",
                  close=True)
_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 401: b"Unauthorized",
            404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            413: b"Content Too Large", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented",
            503: b"Service Unavailable"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_TOO_LARGE = error(431, f"request head over {MAX_HEAD} bytes", close=True)
_REFUSED = error(503, "too many connections", close=True)
_CODING = error(501, "Transfer-Encoding other than chunked alone is not supported",
                close=True)


def _parse_error(reason: str) -> Response:
    """The answer to a request llhttp refused: 501 for a transfer coding it does not
    take (``chunked, gzip``, two Transfer-Encoding lines), else 400 with its reason."""
    if "Transfer-Encoding" in reason and "Content-Length" not in reason:
        return _CODING
    return error(400, f"malformed HTTP request: {reason}", close=True)


def _head(status: int, content_type: bytes, length: int, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
        status, _REASONS.get(status, b"Unknown"), content_type, length,
        b"connection: close\r\n" if close else b"")


class _Slot:
    """An answer of one connection, in request order: ``data`` is None until decided.
    Called with the :class:`Response` once it is (an admit's, a store job's)."""

    __slots__ = ("close", "data", "protocol")

    def __init__(self, protocol: HttpProtocol, data: bytes | None, close: bool) -> None:
        self.protocol = protocol
        self.data = data
        self.close = close

    def __call__(self, response: Response) -> None:
        if self.data is not None:  # answered already
            return
        self.close = self.close or response.close
        self.data = _head(response.status, response.content_type, len(response.body),
                          self.close) + response.body
        self.protocol.drain()


class HttpServer:
    """What the connections of one worker share: the service, its admits and store
    thread, the bounds, the set of open connections, and one read buffer (a read is
    parsed before the next one is made, so one buffer serves them all)."""

    def __init__(self, service: Service, admits: Admits, store: StoreThread,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.service = service
        self.admits = admits
        self.store = store
        self.limits = limits
        self.connections: set[HttpProtocol] = set()
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.refused = 0  # connections refused since the last sweep

    def protocol(self) -> HttpProtocol:
        """A new connection's protocol (``loop.create_server``'s factory)."""
        return HttpProtocol(self)

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

    def close(self) -> None:
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()


class HttpProtocol(asyncio.BufferedProtocol):
    """HTTP/1.1 on one connection: httptools' parser calls back here and each request
    is answered at once, in order, as its bytes are read. No task per request: the
    answer is one ``write``. Bounds: :data:`MAX_HEAD` (431), counted as the bytes
    arrive, :data:`MAX_BODY` (413), reads of :data:`READ_SIZE`; a malformed request
    gets 400; each answer ends the connection when the client asked so
    (``Connection: close``, HTTP/1.0)."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.service = server.service
        self.connections = server.connections
        self.admits = server.admits
        self.store = server.store
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
        server = self.server
        if len(self.connections) >= server.limits.max_connections:  # refused, not queued
            server.refused += 1
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
        return self.server.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        try:
            self._feed(self.server.buffer[:nbytes])
        except httptools.HttpParserUpgrade:
            self._answer(error(400, "protocol upgrade not supported", close=True), True)
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
        self._answer(error(500, "internal error", close=True), True)

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
                self._error = error(400, "bad Content-Length", close=True)
            elif int(digits) > self._max_body():
                self._error = TOO_LARGE
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
            self._abort(UNAUTHORIZED)
        elif self._continue and self.transport is not None:
            # the body is asked for only from a client with the token
            if not self.service.authorized(self._auth):
                self._abort(UNAUTHORIZED)
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body():
            self._abort(TOO_LARGE)
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
        if self._url == b"/v1/admit" and self.parser.get_method() == b"POST" and \
                service.authorized(self._auth):
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            try:
                call, deadline = admit_of(body, service.engine)
            except BadRequest as e:
                self._answer(error(400, str(e)), not keep)
                return
            except Exception as e:  # as Service.route: never a traceback
                service.log.error("request_failed", path="/v1/admit", error=repr(e))
                self._answer(error(500, "internal error"), not keep)
                return
            self.admits.add(call, self._slot(keep), deadline)
            return
        if not service.authorized(self._auth):
            self._answer(UNAUTHORIZED, True)
            return
        url = self._url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        method = self.parser.get_method().decode("latin-1")
        r = service.route(method, path, body)
        if isinstance(r, Job):  # it asks the store: in the store thread
            self.store.job(self._slot(keep), r, path, head=method == "HEAD")
            return
        if method == "HEAD":
            r = Response(r.status, b"", r.content_type, r.close)
        self._answer(r, not keep or r.close)

    def _slot(self, keep: bool) -> _Slot:
        """The place of an answer still to come, in request order."""
        slot = _Slot(self, None, not keep)
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
        if self._slots:  # an earlier answer is still to come: answer after it
            self._slots.append(_Slot(self, data, close))
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
            self._answer(error(408, f"request not read whole in {limits.head_timeout:g} s",
                               close=True), True)
        elif not self._slots and not self._begun and now - self.last > limits.idle_timeout:
            self._closing = True
            t.close()
