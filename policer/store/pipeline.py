"""Admits pipelined from an asyncio event loop, on a Redis connection of their own.

A decision service's worker (``policer serve``) sends each admit's ``FCALL`` from its
event loop without waiting for the reply: several calls in flight on one connection,
the admits of one turn of the loop in one write, the replies parsed by hiredis's
:class:`~hiredis.Reader` as they arrive, in order, each handed to its caller's
callback as soon as it is read.

:class:`AdmitPipeline` opens that connection itself, from what redis-py's public API
says about the store's client: its connection pool's ``connection_kwargs`` (host and
port, or a Unix socket's path; database, user and password or credential provider,
RESP version, client name, TLS settings) and, for a Sentinel URL, the primary the
sentinels name now (``SentinelConnectionPool.get_master_address``, asked at every
connect, in a thread). The connection is asyncio's own: TCP, or TLS through asyncio's
SSL transport for ``rediss://`` (and Sentinel's ``ssl=true``) with the context
redis-py would build; then ``HELLO 3`` with the credentials when the URL asks for RESP3
(else ``AUTH``), ``CLIENT SETNAME`` when it names the client, ``SELECT`` for a database
other than 0. Admits go out once every handshake reply is in.

No reply is waited for longer than the store timeout (counted from when each call
arrived): then, or when the connection breaks, every call in flight gets a
:class:`~policer.store.base.StoreError` marked ``maybe_applied`` (its request may yet
be applied, or was; it carries its caller's deadline, after which the function writes
nothing) and the connection is dropped; :meth:`AdmitPipeline.open` opens another (at
most every :data:`RETRY_S`). A Cluster URL has no pipeline (its slot's owner may move:
those calls go through the store's own client), nor has a TLS setting redis-py checks
that this module does not (OCSP).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection
from redis.credentials import UsernamePasswordCredentialProvider
from redis.sentinel import SentinelConnectionPool

from policer.call import Call
from policer.log import get_logger
from policer.store.base import CallResult, Store, StoreError
from policer.store.connect import url_scheme
from policer.store.redis_store import RedisStore, call_result, store_error

__all__ = ["RETRY_S", "Admit", "AdmitPipeline", "Endpoint", "Result", "admit_pipeline"]

#: Seconds between two attempts to open the pipeline's connection.
RETRY_S = 0.25

#: What a call's admit came to: the store's decision, or why there is none.
Result = CallResult | StoreError

#: TLS settings of redis-py's SSLConnection that this module does not reproduce: a
#: store whose URL sets one has no pipeline (its calls go through redis-py).
_UNSUPPORTED_TLS = ("ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "ssl_ocsp_context",
                    "ssl_ocsp_expected_cert")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "required": ssl.CERT_REQUIRED}


class Admit(NamedTuple):
    """One call to decide on the pipeline."""

    call: Call
    #: when the caller stops waiting, in the store's clock: the request carries it, and
    #: arriving later it writes nothing (the function answers ``POLICER late``)
    deadline_ms: int
    #: ``time.perf_counter()`` when the call arrived: its reply is waited for until
    #: then plus the store timeout
    t0: float
    #: called once, in the event loop, with the decision or why there is none
    done: Callable[[Result], None]


@dataclass(frozen=True)
class Endpoint:
    """Where the pipeline's connection goes, and what it says before the first admit."""

    host: str = ""
    port: int = 0
    path: str = ""  # a Unix socket's (then no host, port or TLS)
    tls: ssl.SSLContext | None = None
    #: AUTH's arguments (``(password,)`` or ``(user, password)``); None: no AUTH
    credentials: tuple[str, ...] | None = field(default=None, repr=False)
    db: int = 0
    protocol: int = 2
    client_name: str | None = None
    connect_timeout_s: float | None = None  # None: the store timeout

    def handshake(self) -> list[tuple[str | int, ...]]:
        """The commands sent first, in order; each must answer without an error (at least
        a ``PING``: the connection is ready once Redis answered on it)."""
        out: list[tuple[str | int, ...]] = []
        auth = self.credentials
        if self.protocol == 3:
            if auth is not None:
                user, password = ("default", auth[0]) if len(auth) == 1 else auth[:2]
                out.append(("HELLO", 3, "AUTH", user, password))
            else:
                out.append(("HELLO", 3))
        elif auth is not None:
            out.append(("AUTH", *auth))
        if self.client_name:
            out.append(("CLIENT", "SETNAME", self.client_name))
        if self.db:
            out.append(("SELECT", self.db))
        return out or [("PING",)]  # at least one answer: Redis serves this connection


class _Source:
    """How to find the store's endpoint, read once from its client's connection pool
    (nothing asked of Redis); :meth:`endpoint` runs at every connect, in a thread (the
    sentinels are asked for the primary then, and a credential provider for its
    credentials)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        kwargs: Mapping[str, Any] = pool.connection_kwargs
        self.kwargs = dict(kwargs)
        cls = pool.connection_class
        self.sentinel = isinstance(pool, SentinelConnectionPool)
        self.unix = isinstance(cls, type) and issubclass(cls, UnixDomainSocketConnection)
        self.tls = isinstance(cls, type) and issubclass(cls, SSLConnection)

    @property
    def supported(self) -> bool:
        return not (self.tls and any(self.kwargs.get(k) for k in _UNSUPPORTED_TLS))

    def endpoint(self) -> Endpoint:
        kw = self.kwargs
        if self.sentinel:
            host, port = self.pool.get_master_address()
        else:
            host, port = kw.get("host", "localhost"), kw.get("port", 6379)
        provider = kw.get("credential_provider")
        if provider is None and (kw.get("username") or kw.get("password")):
            provider = UsernamePasswordCredentialProvider(kw.get("username"),
                                                          kw.get("password"))
        credentials = tuple(provider.get_credentials()) if provider is not None else None
        timeout = kw.get("socket_connect_timeout") or kw.get("socket_timeout")
        return Endpoint(
            host="" if self.unix else str(host), port=0 if self.unix else int(port),
            path=str(kw.get("path", "")) if self.unix else "",
            tls=_tls_context(kw) if self.tls else None, credentials=credentials,
            db=int(kw.get("db") or 0), protocol=int(kw.get("protocol") or 2),
            client_name=kw.get("client_name") or None,
            connect_timeout_s=float(timeout) if timeout else None)


def _tls_context(kw: Mapping[str, Any]) -> ssl.SSLContext:
    """The context redis-py's SSLConnection builds from the same settings."""
    reqs = kw.get("ssl_cert_reqs", "required")
    if reqs is None:
        mode = ssl.CERT_NONE
    elif isinstance(reqs, str):
        if reqs not in _CERT_REQS:
            raise ValueError(f"invalid ssl_cert_reqs {reqs!r}")
        mode = _CERT_REQS[reqs]
    else:
        mode = ssl.VerifyMode(reqs)
    ctx = ssl.create_default_context()
    ctx.check_hostname = bool(kw.get("ssl_check_hostname", True)) and mode != ssl.CERT_NONE
    ctx.verify_mode = mode
    certfile: Any = kw.get("ssl_certfile")
    if certfile or kw.get("ssl_keyfile"):
        ctx.load_cert_chain(certfile=certfile, keyfile=kw.get("ssl_keyfile"),
                            password=kw.get("ssl_password"))
    if kw.get("ssl_ca_certs") or kw.get("ssl_ca_path") or kw.get("ssl_ca_data"):
        ctx.load_verify_locations(cafile=kw.get("ssl_ca_certs"), capath=kw.get("ssl_ca_path"),
                                  cadata=kw.get("ssl_ca_data"))
    for flag in kw.get("ssl_include_verify_flags") or ():
        ctx.verify_flags |= flag
    for flag in kw.get("ssl_exclude_verify_flags") or ():
        ctx.verify_flags &= ~flag
    if kw.get("ssl_min_version") is not None:
        ctx.minimum_version = kw["ssl_min_version"]
    if kw.get("ssl_ciphers"):
        ctx.set_ciphers(kw["ssl_ciphers"])
    return ctx


def admit_pipeline(store: Store, node: str, loop: asyncio.AbstractEventLoop,
                   timeout_s: Callable[[], float],
                   on_opened: Callable[[], None] = lambda: None) -> AdmitPipeline | None:
    """The pipeline of ``node``'s admits to ``store`` from ``loop`` (not connected yet:
    :meth:`AdmitPipeline.open`); None when the store has none (in-process, Cluster, a
    TLS setting it cannot reproduce). ``timeout_s``: the store timeout now (the
    policy's, which a reload may change); ``on_opened``: called in the loop whenever an
    attempt to open the connection ended (:attr:`AdmitPipeline.ready` says how)."""
    if not isinstance(store, RedisStore) or url_scheme(store.url) == "redis+cluster":
        return None
    try:
        pool = getattr(store.client, "connection_pool", None)
    except StoreError as e:  # no client for this URL: the store's own calls say why
        get_logger("policer.store").warning("admit_pipeline_unavailable", error=str(e))
        return None
    if pool is None:
        return None
    source = _Source(pool)
    if not source.supported:
        return None
    return AdmitPipeline(store, source, node, loop, timeout_s, on_opened)


class AdmitPipeline:
    """One process's pipelined admits to a Redis store (see the module's text). Lives
    in one event loop: call it from there only."""

    def __init__(self, store: RedisStore, source: _Source, node: str,
                 loop: asyncio.AbstractEventLoop, timeout_s: Callable[[], float],
                 on_opened: Callable[[], None]) -> None:
        self.store = store
        self.node = node
        self.loop = loop
        self._source = source
        self._timeout_s = timeout_s
        self._on_opened = on_opened
        #: why there is no connection (the last attempt's failure)
        self.why = "ConnectionError: no connection to the store yet"
        self._conn: _Connection | None = None  # open, its handshake answered
        self._opening = False
        self._next_open = 0.0  # monotonic time of the next attempt
        self._timer: asyncio.TimerHandle | None = None  # the oldest reply's deadline
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._resolver = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="policer-pipe")
        self._function: tuple[object, bytes, bytes] | None = None
        self.log = get_logger("policer.store")

    @property
    def ready(self) -> bool:
        """The connection is open and its handshake answered: :meth:`send` sends."""
        return self._conn is not None

    @property
    def opening(self) -> bool:
        """An attempt to open the connection is under way."""
        return self._opening

    def open(self) -> None:
        """Start opening the connection, unless it is open, being opened, or an attempt
        began less than :data:`RETRY_S` ago. ``on_opened`` tells when it ends."""
        if self._conn is not None or self._opening or self._closed:
            return
        now = time.monotonic()
        if now < self._next_open:
            return
        self._next_open = now + RETRY_S
        self._opening = True
        self._task = self.loop.create_task(self._open())

    async def _open(self) -> None:
        loop = self.loop
        conn = _Connection(self)
        timeout = self._timeout_s()
        try:
            ep = await loop.run_in_executor(self._resolver, self._source.endpoint)
            connect_timeout = max(ep.connect_timeout_s or timeout, 0.05)
            if ep.path:
                opening = loop.create_unix_connection(lambda: conn, ep.path)
            else:
                opening = loop.create_connection(
                    lambda: conn, ep.host, ep.port, ssl=ep.tls,
                    server_hostname=ep.host if ep.tls is not None else None)
            try:
                await asyncio.wait_for(opening, connect_timeout)
            except TimeoutError:
                raise TimeoutError(f"no connection to {ep.path or f'{ep.host}:{ep.port}'} "
                                   f"in {connect_timeout * 1000:.0f} ms") from None
            try:
                await asyncio.wait_for(conn.handshake(ep.handshake()), max(timeout, 0.05))
            except TimeoutError:
                raise TimeoutError(f"no handshake reply in {timeout * 1000:.0f} ms") from None
        except Exception as e:  # Redis down, refused, stalled: the callers' fallback decides
            self.why = str(store_error(e))
        else:
            if not self._closed:
                self._conn = conn
                self.log.info("admit_pipeline_open", node=self.node,
                              redis=ep.path or f"{ep.host}:{ep.port}", tls=ep.tls is not None,
                              db=ep.db, resp=ep.protocol)
        finally:
            if self._conn is not conn:
                conn.abort()  # failed, or the pipeline closed meanwhile
            self._opening = False
            self._task = None
            if not self._closed:
                self._on_opened()

    # -- admits
    def send(self, admits: Sequence[Admit]) -> None:
        """Send the admits in one write; each one's ``done`` is called with its reply
        (in the order they were sent), or with a StoreError. Without an open
        connection, every one gets the reason at once (nothing was sent)."""
        conn = self._conn
        if conn is None or conn.transport is None:
            _deliver(admits, StoreError(self.why), self.log)
            return
        try:
            data = b"".join([self._command(a.call, a.deadline_ms) for a in admits])
        except Exception as e:  # defensive: a call that cannot be packed is not sent
            _deliver(admits, StoreError(f"admit: {e!r}"), self.log)
            return
        conn.inflight.extend(admits)
        conn.transport.write(data)
        if self._timer is None:
            self._check()

    def _command(self, call: Call, deadline_ms: int) -> bytes:
        """The admit function's ``FCALL`` for ``call``, as the store sends it."""
        store = self.store
        library = store.library
        fn = self._function
        if fn is None or fn[0] is not library:  # a reload swapped the library
            fn = self._function = (library, library.function("admit").encode(),
                                   library.prefix.encode())
        packed: bytes = hiredis.pack_command(
            (b"FCALL", fn[1], 1, fn[2], *store.call_arguments(call, self.node, "a",
                                                              deadline_ms)))
        return packed

    def _reply(self, admit: Admit, reply: Any) -> None:
        result: Result
        if isinstance(reply, Exception):  # an error reply
            result = store_error(reply)
        else:
            try:
                result = call_result(reply)
            except Exception as e:  # defensive: a reply this version cannot read
                result = StoreError(f"admit: {e!r}")
        _deliver((admit,), result, self.log)

    def _check(self) -> None:
        """The oldest call in flight answered in time, or the connection given up."""
        self._timer = None
        conn = self._conn
        if conn is None or not conn.inflight:
            return
        timeout = self._timeout_s()
        late = conn.inflight[0].t0 + timeout - time.perf_counter()
        if late <= 0:
            self.lost(conn, f"TimeoutError: no reply in {timeout * 1000:.0f} ms")
        else:
            self._timer = self.loop.call_later(late, self._check)

    def lost(self, conn: _Connection, error: str) -> None:
        """The connection broke or a reply is late: it is dropped, every call in flight
        gets ``error`` (marked ``maybe_applied``), and another connection is opened."""
        if self._conn is conn:
            self._conn = None
        conn.abort()
        self.why = error
        inflight, conn.inflight = conn.inflight, collections.deque()
        given_up = StoreError(error)
        given_up.maybe_applied = True  # the requests may still be applied (or were)
        _deliver(inflight, given_up, self.log)
        self.open()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._resolver.shutdown(wait=False, cancel_futures=True)


def _deliver(admits: Sequence[Admit] | collections.deque[Admit], result: Result,
             log: Any) -> None:
    for a in admits:
        try:
            a.done(result)
        except Exception as e:  # a caller's bug must not break the connection's reading
            log.error("admit_callback_failed", error=repr(e))


class _Connection(asyncio.Protocol):
    """The pipeline's connection: the handshake's replies, then the admits', in order."""

    def __init__(self, pipeline: AdmitPipeline) -> None:
        self.pipeline = pipeline
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self.inflight: collections.deque[Admit] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[None] | None = None
        self._handshake_left = 0

    def handshake(self, commands: Sequence[tuple[str | int, ...]]) -> asyncio.Future[None]:
        """Send the handshake's commands; the future is done when each answered (its
        exception: the first error reply)."""
        fut = self._handshake = self.pipeline.loop.create_future()
        if not commands:
            fut.set_result(None)
        elif self.transport is None:
            fut.set_exception(ConnectionError("connection closed by Redis"))
        else:
            self._handshake_left = len(commands)
            self.transport.write(b"".join(hiredis.pack_command(cast(Any, c))
                                          for c in commands))
        return fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        try:
            while self._handshake_left:
                r = reader.gets()
                if r is False:
                    return
                self._handshake_left -= 1
                fut = self._handshake
                if isinstance(r, Exception):
                    self._handshake_left = 0
                    if fut is not None and not fut.done():
                        fut.set_exception(r)
                    return
                if not self._handshake_left and fut is not None and not fut.done():
                    fut.set_result(None)
            reply = self.pipeline._reply
            inflight = self.inflight
            while inflight:
                r = reader.gets()
                if r is False:
                    return
                reply(inflight.popleft(), r)
        except hiredis.ProtocolError as e:
            self.pipeline.lost(self, f"ProtocolError: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        why = f"ConnectionError: {exc or 'connection closed by Redis'}"
        fut = self._handshake
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError(why))
        if self.pipeline._conn is self or self.inflight:
            self.pipeline.lost(self, why)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
