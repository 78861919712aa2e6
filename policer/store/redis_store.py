"""The Redis store: dialog profiles shared by every proxy worker.

Every decision and every dialog event is one ``FCALL`` of the policy's function
library (the files of ``policer/store/lua/lib/`` after the constants
:func:`policer.compile.compile_policy` writes in front of it), sent on a connection
of the store's own (see :meth:`RedisStore._fcall`). A Redis that lost the library
(restarted empty, a new replica promoted before it replicated) answers "Function
not found": the store loads the library and calls again, transparently (a library
of more than :data:`INLINE_LOAD_BYTES` is never loaded inside a decision: the node's
tick, its start or ``policer load`` load it). Loading a library (``FUNCTION LOAD``)
is a control-plane call on a connection of its own, bounded by the policy's
``load_timeout`` (10 s by default), never by the decision path's ``store_timeout``,
and tried :data:`LOAD_ATTEMPTS` times with a growing pause (:meth:`RedisStore.load`).
Connections are opened lazily and per process id, so a store created before a fork (as in
Kamailio, which imports the script before forking its workers) never shares a
socket between processes. Every Redis failure becomes a :class:`StoreError`.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import redis
from hiredis import pack_command
from redis.client import NEVER_DECODE

from policer import protocol
from policer.calendar import LocalClock
from policer.call import Call, pack_fields, raw_bytes, unpack_fields, unpack_values, utf8_text
from policer.compile import (
    TICK_BATCH,
    Library,
    compile_policy,
)
from policer.log import get_logger, redact
from policer.policy import Policy, Rate
from policer.policy.model import shared_counts
from policer.protocol import ATTEMPT, unpack_record
from policer.store.base import (
    STATS_FIELDS,
    Attempt,
    CallRecord,
    CallResult,
    DialogInfo,
    EgressResult,
    ExplainRow,
    Op,
    StoreError,
    StoreInfo,
    TickResult,
    Usage,
    pack_ops,
    usage_of,
)
from policer.store.connect import connect, url_scheme
from policer.store.fraud import FraudBlock, FraudEvent, FraudState
from policer.store.keys import Keys, key_part, label_from_key, value_from_key

__all__ = ["INLINE_LOAD_BYTES", "LOAD_ATTEMPTS", "RedisStore"]

#: A library up to this size is loaded inside the call that found Redis without it (a
#: few ms); a bigger one (a class of many prefixes) takes longer than a decision may
#: wait, and loading it again at every call kept Redis busy: its load is left to the
#: control plane (the node's tick, start, policer load), and the call fails over to
#: the policy's on_store_error at once.
INLINE_LOAD_BYTES = 256 * 1024
#: Tries of one FUNCTION LOAD, 0.5 s then 1 s apart (each bounded by load_timeout).
LOAD_ATTEMPTS = 3
#: The layout of the namespace's state this policer writes (the counts hash's
#: ``#layout``); an older one is moved to it by the first load (``_upgrade_layout``).
LAYOUT = "2"
#: The bound on one FUNCTION LOAD when no policy says (Policy.load_timeout_ms).
LOAD_TIMEOUT_MS = 10_000
#: One change of a value's live limits, made inside Redis (:meth:`RedisStore._swap_live`)
_LIVE_LIMITS_LUA = (resources.files("policer.store") / "lua" / "live_limits.lua").read_text()
#: The bound on a node's periodic calls (its reading of the store, its lease renewal and
#: sweeps: :meth:`RedisStore.info`, :meth:`RedisStore.tick`) when the store's timeout is
#: shorter: a link slower than ``store_timeout`` sends INVITEs to the fallback, but must
#: not let the node's lease lapse (its calls would be ended, others admitted in their
#: place, and put back over the max when the link recovers).
PERIODIC_TIMEOUT_MS = 1_000


class _ScriptConnection(threading.local):
    """Per thread: the connection ``_fcall`` uses, the process that opened it, and
    whether a reply came back on it since it was (re)opened (an error that broke an
    open socket is worth one retry on a new one; a failed fresh connect is not)."""

    conn: Any = None
    pid: int = -1
    open: bool = False


def _is_missing_function(e: redis.ResponseError) -> bool:
    return "function not found" in str(e).lower()


class RedisStore:
    """Dialog profiles in Redis, decided by the policy's function library.

    ``url`` is any store URL (``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://``, ``redis+cluster://``); ``timeout_ms`` bounds every call
    (connect and reply) but a library's load, which ``load_timeout_ms`` bounds (default:
    the policy's ``load_timeout``, else 10 s). ``policy``: the policy the library is
    compiled from (None: a library for explicit memberships only, :meth:`admit`).
    ``clock_offset_ms`` shifts the store's clock: a testing aid that lets a test jump
    time forward on a real Redis; leave it 0.
    """

    #: Lua appended to the library this store compiles (none: the proxies' library;
    #: the tests add their own entry points)
    extra_lua: tuple[str, ...] = ()

    def __init__(
        self,
        url: str,
        namespace: str,
        timeout_ms: int = 50,
        *,
        policy: Policy | None = None,
        clock_offset_ms: int = 0,
        client_factory: Callable[[], redis.Redis] | None = None,
        load_timeout_ms: int | None = None,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.timeout_ms = timeout_ms
        self._load_timeout_ms = load_timeout_ms
        self._control: redis.Redis | None = None  # the connection loads use
        self._control_pid = -1
        self._control_timeout = 0
        self._load_lock = threading.Lock()  # one load at a time in a process
        self._tickets = itertools.count(1)  # each load_library call's turn
        self._newest = 0  # the newest load asked for: an older one still waiting is moot
        self.clock_offset_ms = clock_offset_ms
        self._factory = client_factory
        self._pid = -1
        self._client: redis.Redis | None = None
        self._local = _ScriptConnection()
        #: the same for a node's periodic calls, bounded by PERIODIC_TIMEOUT_MS
        self._periodic = _ScriptConnection()
        self._known_sources: dict[str, list[str]] = {}
        #: a call of the library succeeded on this store (then a Redis without it lost it)
        self._worked = False
        #: the namespace's state epoch as this store last saw it (:meth:`info`, :meth:`tick`)
        self.epoch: str | None = None
        #: this node's clock minus Redis's (ms), as its engine measured it
        self.clock_skew_ms = 0.0
        self._nodes: dict[str, str] = {}
        self._policy = policy
        self._clock = LocalClock(policy.timezone if policy is not None else "UTC")
        self._set_library(compile_policy(policy, namespace, self.extra_lua), policy)
        # a Cluster client routes by key itself (MOVED, ASK): _fcall uses its execute_command
        self._cluster = url_scheme(url) == "redis+cluster"

    def _set_library(self, library: Library, policy: Policy | None) -> None:
        self.library = library
        self._policy = policy
        self._clock = LocalClock(policy.timezone if policy is not None else "UTC")
        # Only a store that knows the policy may load its library on its own when Redis
        # has none: a policy-less library loaded into a namespace the proxies use would
        # decide their calls with no profile at all.
        self._autoload = policy is not None
        self._fn = {op: library.function(op) for op in (
            "admit", "admitm", "egress", "batch", "tick", "read")}  # (admitm: the tests')

    # -- connection
    @property
    def client(self) -> redis.Redis:
        """This process's client (a new one after a fork)."""
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            self._client = self._connect()
            self._pid = pid
        return self._client

    def _connect(self) -> redis.Redis:
        if self._factory is not None:
            return self._factory()
        try:  # every URL form of policer.store.connect; a Cluster client connects at once
            return connect(self.url, self.timeout_ms / 1000)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"{type(e).__name__}: {redact(str(e))}") from e

    def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"{type(e).__name__}: {redact(str(e))}") from e

    # -- the library
    def use(self, policy: Policy | None) -> None:
        """Decide by ``policy`` from now on, without contacting Redis: its library is
        loaded when Redis says it has none (or by :meth:`load`)."""
        self._set_library(compile_policy(policy, self.namespace, self.extra_lua), policy)

    def load(self, policy: Policy | None, *, epoch: str | None = None) -> str:
        """Compile ``policy`` and make it the library every caller of this namespace
        decides by (``FUNCTION LOAD REPLACE``; on every primary of a Cluster): a
        control-plane call, bounded by ``load_timeout_ms`` per try, tried
        :data:`LOAD_ATTEMPTS` times (StoreError saying so when every try failed). The
        namespace's state epoch op ``epoch`` is done in the same transaction (see
        :meth:`_load_library`; None: the epoch follows the reloaded library, or a fresh
        namespace gets one)."""
        library = compile_policy(policy, self.namespace, self.extra_lua)
        self.load_library(library, policy, epoch)
        self._set_library(library, policy)
        self._autoload = True  # loaded on purpose: loading it again when Redis lost it is too
        self._upgrade_layout()
        return library.policy_hash

    def _upgrade_layout(self) -> None:
        """The state an older policer kept otherwise, moved once (the counts hash's
        ``#layout`` field names the layout, :data:`LAYOUT`): live parents from the
        counts hash (``^level:value``) to :attr:`Keys.parents` (a parent set meanwhile
        stands: ``HSETNX``), and a value's live caps (``R|`` fields) into its live
        limits field after its live max (merged inside Redis: a live limit set
        meanwhile stands). The fields are scanned without blocking Redis;
        moved parents or caps give the live version a new token, which makes the plans
        built before stale."""
        client = self.client
        counts, parents = self.keys.counts, self.keys.parents
        if _str(self._run(lambda: client.hget(counts, "#layout")) or "") == LAYOUT:
            return
        old = self._run(lambda: [(_str(f), v) for f, v in client.hscan_iter(
            counts, match="[R^]?*", count=1000)])
        caps = [(f, v) for f, v in old if f.startswith("R|")]
        up = [(f, v) for f, v in old if f.startswith("^")]
        script = self._live_script()

        def move() -> None:
            pipe = client.pipeline(transaction=True)
            for f, v in up:
                pipe.hsetnx(parents, f[1:], v)
                pipe.hdel(counts, f)
            for f, v in caps:
                # (merged inside Redis: a live limit set meanwhile stands)
                script(keys=[counts], args=["merge", "L" + f[1:], self.keys.LIVE_VERSION,
                                            _live_token(), f, v], client=pipe)
            pipe.hset(counts, "#layout", LAYOUT)
            if up and not caps:  # (a cap's merge gives the live version a new token)
                self._renew_live_version(pipe)
            pipe.execute()

        self._run(move)
        if old:
            get_logger("policer.store").info("layout_upgraded", parents=len(up),
                                             live_caps=len(caps), layout=LAYOUT)

    @property
    def load_timeout_ms(self) -> int:
        """The bound on one FUNCTION LOAD: as given, else the policy's load_timeout."""
        if self._load_timeout_ms is not None:
            return self._load_timeout_ms
        return self._policy.load_timeout_ms if self._policy is not None else LOAD_TIMEOUT_MS

    def load_library(self, library: Library, policy: Policy | None = None,
                     epoch: str | None = None) -> str:
        """``FUNCTION LOAD REPLACE`` of a compiled library, without deciding by it here
        yet (:meth:`use_library` does; a reload loads in the background, then swaps).
        ``policy``: whose ``load_timeout`` bounds each try (default: this store's);
        ``epoch``: the state epoch op done with it (None: :meth:`_reload_epoch`)."""
        timeout_ms = (self._load_timeout_ms if self._load_timeout_ms is not None else
                      policy.load_timeout_ms if policy is not None else self.load_timeout_ms)
        ticket = self._newest = next(self._tickets)
        self._load_library(library, timeout_ms, ticket, epoch)
        return library.policy_hash

    def _reload_epoch(self, client: Any, library: Library) -> str | None:
        """The epoch op of a deliberate load (read on the loading connection, within
        its bound): the epoch follows the new library when Redis holds one
        (``reload:<mark>:<run>``, the server's mark and the epoch's read now), a fresh
        namespace gets one (``init``). None: Redis holds this very library already, on
        the server its epoch was confirmed on; loading it again would only reset its
        Lua memory (nodes starting together load the same library at once)."""
        try:
            r = client.execute_command("FCALL_RO", library.function("read"), 1,
                                       library.prefix, "info", 0)
        except redis.ResponseError as e:
            if _is_missing_function(e):
                return "init"
            raise
        if len(r) <= 7:
            return "init"
        mark, run = _str(r[7]), _str(r[6])
        if _str(r[0]) == library.policy_hash and _str(r[5]) and run == mark:
            return None
        return f"reload:{mark}:{run}"

    def use_library(self, library: Library, policy: Policy | None) -> None:
        """Decide by a library compiled (and loaded) already: :meth:`use` without the
        compile, for a swap that must be quick."""
        self._set_library(library, policy)
        self._autoload = True

    def _load_library(self, library: Library, timeout_ms: int | None = None,
                      ticket: int = 0, epoch: str | None = "init") -> None:
        """FUNCTION LOAD REPLACE on the control connection, :data:`LOAD_ATTEMPTS` tries
        0.5 s then 1 s apart. A try that failed may have loaded it all the same (a
        reply later than the timeout): before trying again, Redis is asked which
        library it holds. A library Redis refuses to compile is not tried again.
        Loads of one process take turns; a load still waiting for its turn when a
        newer one was asked for (``ticket``) is dropped: it would undo the newer. The
        state epoch op ``epoch`` (the library's ``epoch_op``: ``init``, ``reload:<mark>``,
        ``missing:<id>``, ``lost:<id>``) runs in the same transaction, so that no admit
        is decided by a library whose epoch is not settled yet."""
        timeout_ms = timeout_ms if timeout_ms is not None else self.load_timeout_ms
        started = time.monotonic()
        pause = 0.5
        error: Exception | None = None
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            with self._load_lock:
                if ticket and ticket < self._newest:
                    return
                client: Any = self._control_client(timeout_ms)
                try:
                    if attempt > 1 and self._holds(client, library):
                        return
                    op = epoch if epoch is not None else self._reload_epoch(client, library)
                    if op is None:
                        return
                    epoch_call = ("FCALL", library.function("tick"), 1, library.prefix,
                                  *_epoch_args(op, self.clock_offset_ms))
                    if self._cluster:
                        # every other primary first; then the namespace's own, in one
                        # transaction with the epoch op (a reader in between would see
                        # the new library's mark before the epoch follows it)
                        owner = client.get_node_from_key(library.prefix)
                        for node in client.get_primaries():
                            if node.name != owner.name:
                                client.execute_command(*_load_command(library),
                                                       target_nodes=node)
                        client = client.get_redis_connection(owner)
                    pipe = client.pipeline(transaction=True)
                    pipe.execute_command(*_load_command(library))
                    pipe.execute_command(*epoch_call)
                    pipe.execute()
                    return
                except (redis.RedisError, OSError) as e:
                    error = e
                    if not _retry_load(e):
                        break
            if attempt < LOAD_ATTEMPTS:
                get_logger("policer.store").warning(
                    "policy_load_retry", library=library.name, attempt=attempt,
                    error=f"{type(error).__name__}: {redact(str(error))}", pause_s=pause)
                time.sleep(pause)
                pause *= 2
        assert error is not None
        tries = f"after {attempt} tries" if attempt > 1 else "at once"
        raise StoreError(
            f"FUNCTION LOAD of library {library.name} ({len(library.text)} bytes) failed "
            f"{tries} in {time.monotonic() - started:.1f} s: {type(error).__name__}: "
            f"{redact(str(error))} (each try is bounded by the policy's load_timeout, "
            f"{timeout_ms} ms)") from error

    def _control_client(self, timeout_ms: int) -> redis.Redis:
        """This process's connection for FUNCTION LOAD, with its own timeout."""
        if self._factory is not None:
            return self.client
        pid = os.getpid()
        if self._control is None or self._control_pid != pid or \
                self._control_timeout != timeout_ms:
            if self._control is not None and self._control_pid == pid:
                self._control.close()
            self._control = connect(self.url, timeout_ms / 1000)
            self._control_pid = pid
            self._control_timeout = timeout_ms
        return self._control

    def _holds(self, client: Any, library: Library) -> bool:
        """Redis holds ``library`` already (its policy hash answers ``info``)."""
        try:
            reply = client.execute_command("FCALL_RO", library.function("read"), 1,
                                           library.prefix, "info")
        except redis.ResponseError:
            return False
        return bool(reply) and str(reply[0]) == library.policy_hash

    def _load_packed(self, epoch: str) -> bytes:
        lib = self.library
        return b"".join(pack_command(c) for c in (
            ("MULTI",), _load_command(lib),
            ("FCALL", lib.function("tick"), 1, lib.prefix,
             *_epoch_args(epoch, self.clock_offset_ms)), ("EXEC",)))

    def _lost_epoch(self) -> str:
        """The epoch op of a store that finds Redis without the library: ``missing:<id>``
        when this store decided by it before (Redis lost it, and its state with it when
        the epoch is gone too), ``init`` when it never did (a fresh namespace)."""
        return f"missing:{self.epoch or ''}" if self._worked else "init"

    def loaded_hash(self) -> str | None:
        """The hash of the policy library Redis holds for this namespace (None: none)."""
        try:
            r = self._fcall("read", ["info"], load=False)
        except StoreError as e:
            if "function not found" in str(e).lower():
                return None
            raise
        return str(r[0])

    def _fcall(self, op: str, args: Sequence[Any], *, load: bool = True,
               raw: bool = False, periodic: bool = False) -> Any:
        """Call one of the library's functions: ``FCALL`` on this thread's own connection.

        The hot path skips redis-py's pool and command machinery (taking a pooled
        connection polls the socket, and command packing checks every argument):
        that is more than a third of a call's client CPU. One connection per
        process and thread; "Function not found" (Redis restarted empty or failed over
        to a replica without it) loads the library and calls again. A connection that
        broke while idle (Redis restarted, failed over) is reopened and the call sent
        once more: every function is idempotent (a dialog id gets the same decision
        again), and a timeout is never retried, so the policy's ``store_timeout`` still
        bounds the call. ``raw``: bulk strings come back as bytes (SIP values as sent).
        """
        name = self._fn[op]
        load = load and self._autoload
        command = ("FCALL_RO" if op == "read" else "FCALL", name, 1, self.library.prefix, *args)
        if self._cluster:  # routed by KEYS[1]'s slot
            client: Any = self.client
            opts = {NEVER_DECODE: True} if raw else {}
            try:
                return self._run(lambda: client.execute_command(*command, **opts))
            except StoreError as e:
                if not isinstance(e.__cause__, redis.ResponseError) \
                        or not _is_missing_function(e.__cause__):
                    raise
                if not load:
                    raise _not_loaded(self.namespace) from e
                if len(self.library.text) > INLINE_LOAD_BYTES:
                    raise _not_loaded_inline(self.library) from e
                self._load_library(self.library)
                return self._run(lambda: client.execute_command(*command, **opts))
        reply = self._fcall_many(op, [args], raw=raw, load=load, periodic=periodic)[0]
        if isinstance(reply, redis.ResponseError):
            raise store_error(reply) from reply
        return reply

    def _fcall_many(self, op: str, argss: Sequence[Sequence[Any]], *, raw: bool = False,
                    load: bool = True, periodic: bool = False) -> list[Any]:
        """Calls of one function on this process's own connection, pipelined: one write,
        then every reply read in order (an error reply comes back as its exception).
        Loads the library when Redis has none (``load``, and a store that knows its
        policy) and sends them all again (every function is idempotent); a connection
        that broke while idle is reopened once. ``periodic``: a node's periodic call,
        on a connection of its own bounded by :data:`PERIODIC_TIMEOUT_MS`."""
        name = self._fn[op]
        prefix = self.library.prefix
        verb = "FCALL_RO" if op == "read" else "FCALL"
        packed = [b"".join(pack_command((verb, name, 1, prefix, *args)) for args in argss)]
        local = self._periodic if periodic else self._local
        conn = local.conn if local.pid == os.getpid() else self._new_connection(local)
        loaded = reconnected = False
        try:
            while True:
                reused = local.open
                try:
                    # connect() is a no-op on an open socket; on a new one it is where a
                    # Sentinel-managed connection asks the sentinels for the primary
                    conn.connect()
                    conn.send_packed_command(packed, check_health=False)
                    replies: list[Any] = []
                    for _ in argss:
                        try:
                            replies.append(conn.read_response(disable_decoding=raw))
                        except redis.ResponseError as e:
                            replies.append(e)
                    local.open = True
                    missing = [r for r in replies if isinstance(r, redis.ResponseError)
                               and _is_missing_function(r)]
                    if not missing:
                        self._worked = True
                        return replies
                    if loaded or not (load and self._autoload):
                        raise missing[0] if loaded else _not_loaded(self.namespace)
                    if len(self.library.text) > INLINE_LOAD_BYTES:
                        raise _not_loaded_inline(self.library)
                    loaded = True
                    conn.send_packed_command([self._load_packed(self._lost_epoch())],
                                             check_health=False)
                    for _ in range(4):  # MULTI, FUNCTION LOAD, FCALL, EXEC
                        conn.read_response()
                except redis.ConnectionError:  # broke while idle: reopen once
                    local.open = False
                    if not reused or reconnected:
                        raise
                    reconnected = True
                    conn.disconnect()
        except (redis.RedisError, OSError) as e:
            if not isinstance(e, redis.ResponseError):
                local.open = False
            raise store_error(e) from e

    def _new_connection(self, local: _ScriptConnection) -> Any:
        """This process's and thread's connection for functions (opened on first use):
        for decisions (``self._local``, the store's timeout) or for a node's periodic
        calls (``self._periodic``, at least :data:`PERIODIC_TIMEOUT_MS`)."""
        conn: Any = self.client.connection_pool.make_connection()
        if local is self._periodic:
            timeout_s = max(self.timeout_ms, PERIODIC_TIMEOUT_MS) / 1000
            conn.socket_timeout = conn.socket_connect_timeout = timeout_s
        local.conn = conn
        local.pid = os.getpid()
        local.open = False
        return conn

    # -- admission
    def call_arguments(self, call: Call, node: str, mode: str = "a",
                       deadline_ms: int | None = None) -> list[Any]:
        """ARGV of ``policer_admit_S`` for a call (what a proxy's cfg sends, too);
        ``deadline_ms``: when the caller stops waiting (Redis's clock), past which the
        function writes nothing."""
        attrs = pack_fields([call.attribute(s) for s in self.library.attributes])
        enc = self._nodes.get(node)
        if enc is None:  # a store serves one node, call after call
            enc = self._nodes[node] = key_part(node) if node else ""
        args = [enc, raw_bytes(call.call_id), raw_bytes(call.from_tag), attrs, mode,
                self.clock_offset_ms, self.library.attributes_sig]
        if deadline_ms is not None:
            args += ["", 0, deadline_ms]
        return args

    def admit_call(self, call: Call, node: str, record: bool = False,
                   deadline_ms: int | None = None) -> CallResult:
        r = self._fcall("admit", self.call_arguments(call, node, "r" if record else "a",
                                                     deadline_ms))
        return call_result(r)

    def admit_calls(self, calls: Sequence[Call], node: str, deadline_ms: int | None = None
                    ) -> list[CallResult | StoreError]:
        """Decide several calls in one round trip: their ``FCALL``s pipelined on this
        thread's connection (Redis runs them one after the other, each atomic, as if
        sent one by one). A call whose reply is an error gets its StoreError in its
        place; a broken connection or a timeout raises for all of them."""
        if len(calls) == 1 or self._cluster:
            out: list[CallResult | StoreError] = []
            for call in calls:
                try:
                    out.append(self.admit_call(call, node, deadline_ms=deadline_ms))
                except StoreError as e:
                    if len(calls) == 1:
                        raise
                    out.append(e)
            return out
        replies = self._fcall_many("admit", [self.call_arguments(call, node, "a", deadline_ms)
                                             for call in calls])
        return [store_error(r) if isinstance(r, Exception)
                else call_result(r) for r in replies]

    def egress(self, dialog_id: str, gateway: str, deadline_ms: int | None = None
               ) -> EgressResult:
        args: list[Any] = [dialog_id, raw_bytes(gateway), self.clock_offset_ms]
        if deadline_ms is not None:
            args += [0, deadline_ms]
        return egress_result(self._fcall("egress", args))

    def explain_call(self, call: Call, at_ms: int | None = None) -> CallResult:
        args = self.call_arguments(call, "", "e")
        if at_ms is not None:
            args.append(at_ms - self.now_ms())
        return call_result(self._fcall("admit", args))

    # -- dialog events
    def apply(self, ops: Sequence[Op], records: bool = False) -> list[object]:
        if not ops:
            return []
        r = self._fcall("batch", [self.pack_ops(ops), 1 if records else 0,
                                  self.clock_offset_ms, self.library.attributes_sig],
                        raw=records)
        out: list[object] = []
        for op, x in zip(ops, r, strict=False):
            if isinstance(x, list):
                out.append(_record(x[0], dict(zip(x[1::2], x[2::2], strict=False)),
                                   self._sources))
            elif op.kind == "release":
                out.append(bool(x))
            else:
                out.append(x == 1)
        out += [False] * (len(ops) - len(out))
        return out

    def apply_packed(self, packed: bytes) -> int:
        """Apply ops already packed in the function's format (a proxy's queue);
        returns how many were read."""
        return len(self._fcall("batch", [packed, 0, self.clock_offset_ms,
                                         self.library.attributes_sig]))

    def pack_ops(self, ops: Sequence[Op]) -> bytes:
        return pack_ops(ops, self.library.attributes)

    def confirm(self, dialog_id: str, dialog_ms: int) -> bool:
        return bool(self.apply([Op("confirm", dialog_id, dialog_ms)])[0])

    def refresh(self, dialog_id: str, timeout_ms: int) -> bool:
        return bool(self.apply([Op("refresh", dialog_id, timeout_ms)])[0])

    def release(self, dialog_id: str, reason: str) -> CallRecord | None:
        r = self.apply([Op("release", dialog_id, reason)], records=True)[0]
        return r if isinstance(r, CallRecord) else None

    # -- dialog variables
    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        return bool(self.apply([Op("set_var", dialog_id, name, value)])[0])

    def get_var(self, dialog_id: str, name: str) -> str | None:
        client = self.client
        key = self.keys.variables(dialog_id)
        v = self._run(lambda: client.hget(key, utf8_text(name)))
        return None if v is None else str(v)

    # -- inspection
    def now_ms(self) -> int:
        return int(self._fcall("read", ["size", self.clock_offset_ms])[-1])

    def sizes(self, fields: Sequence[str]) -> list[int]:
        """The counts of these fields of the counts hash (``Keys.count_field``)."""
        r = self._fcall("read", ["size", self.clock_offset_ms, *fields])
        return [int(x) for x in r[:-1]]

    def dialog(self, dialog_id: str) -> DialogInfo | None:
        client: Any = self.client

        def read() -> list[Any]:
            pipe: Any = client.pipeline(transaction=False)
            pipe.execute_command("GET", self.keys.dialog(dialog_id), NEVER_DECODE=True)
            pipe.execute_command("HGETALL", self.keys.variables(dialog_id), NEVER_DECODE=True)
            return list(pipe.execute())

        raw, variables = self._run(read)
        if not raw:
            return None
        rec = unpack_record(raw)
        return _dialog_info(dialog_id, raw, variables,
                            self._sources(rec["sig"]) if rec else None)

    def profile_size(self, profile: str, value: str | None = None) -> int:
        return self.sizes([self.keys.count_field(profile, value)])[0]

    def profile_values(self, profile: str) -> dict[str, int]:
        client = self.client
        pattern = self.keys.value_pattern(profile)
        plen = len(profile) + 1
        rows = self._run(lambda: list(client.hscan_iter(self.keys.counts, match=pattern,
                                                        count=1000)))
        return {value_from_key(f[plen:]): int(n) for f, n in sorted(rows) if int(n) > 0}

    def profile_list(self, profile: str, value: str | None = None) -> list[DialogInfo]:
        """The live dialogs counted in a profile (a value): every node's dialogs read
        and picked by their count fields (an operator's command: O(live dialogs))."""
        want = self.keys.count_field(profile, value)
        client: Any = self.client

        def ids_of(node: str) -> list[str]:
            return list(client.zrange(self.keys.node_of_part(node), 0, -1))

        def records(chunk: list[str]) -> list[Any]:
            return list(client.execute_command("MGET", *(self.keys.dialog(d) for d in chunk),
                                               NEVER_DECODE=True))

        nodes: list[str] = self._run(lambda: sorted(client.smembers(self.keys.nidx)))
        out: list[DialogInfo] = []
        for node in nodes:
            ids = self._run(functools.partial(ids_of, node))
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                raws = self._run(functools.partial(records, chunk))
                for did, raw in zip(chunk, raws, strict=True):
                    rec = unpack_record(raw) if raw else None
                    if rec is None or rec["state"] not in (b"early", b"confirmed"):
                        continue
                    if want in _str(rec["members"]).split(","):
                        info = _dialog_info(did, raw, {}, self._sources(rec["sig"]))
                        if info is not None:
                            out.append(info)
        out.sort(key=lambda d: (d.deadline_ms, d.dialog_id))
        return out

    def _sources(self, sig: bytes | str) -> list[str]:
        """The attribute sources a record's attributes were packed by: this library's
        own, or those its library registered (``P sigs``); [] unknown."""
        text = _str(sig)
        if text == self.library.attributes_sig or not text:
            return list(self.library.attributes)
        known = self._known_sources.get(text)
        if known is None:
            client = self.client
            names = self._run(lambda: client.hget(self.keys.sigs, text))
            known = _sources_of(names or "")
            self._known_sources[text] = known
        return known

    def stats(self) -> dict[str, int]:
        client = self.client

        def read() -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.hgetall(self.keys.stats)
            pipe.hgetall(self.keys.decisions)
            pipe.smembers(self.keys.nidx)
            pipe.hget(self.keys.counts, "#confirmed")
            return pipe.execute()

        raw, decisions, nodes, confirmed = self._run(read)
        out = {k: 0 for k in STATS_FIELDS}
        out.update(stats_from(raw, decisions))

        def active() -> int:
            pipe = client.pipeline(transaction=False)
            for n in sorted(nodes):
                pipe.zcard(self.keys.node_of_part(n))
            return sum(int(x) for x in pipe.execute())

        out["active"] = self._run(active) if nodes else 0
        out["confirmed"] = int(confirmed or 0)
        out["early"] = max(0, out["active"] - out["confirmed"])
        return out

    def ended(self) -> dict[str, int]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.stats))
        return {k[6:]: int(v) for k, v in raw.items() if k.startswith("ended:")}

    def decisions(self) -> dict[tuple[str, str], int]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.decisions))
        return decisions_from(raw)

    # -- live limits (fields of the counts hash: L| a value's live max and caps, T| state)
    def limit_get(self, profile: str, value: str) -> int | None:
        client = self.client
        v = self._run(lambda: client.hget(self.keys.counts, self.keys.limit_field(profile,
                                                                                   value)))
        return _live_max(None if v is None else _str(v))

    def limit_set(self, profile: str, value: str, maximum: int) -> int | None:
        old = self._swap_live(profile, value, "", str(maximum))
        return None if old is None else int(old)

    def limit_unset(self, profile: str, value: str) -> int | None:
        old = self._swap_live(profile, value, "", None)
        return None if old is None else int(old)

    def limits(self, profile: str) -> dict[str, int]:
        out = {}
        for v, raw in self._value_fields("L|", profile).items():
            mx = _live_max(raw)
            if mx is not None:
                out[v] = mx
        return out

    def parent_set(self, profile: str, value: str, parent: str) -> str | None:
        old = self._swap_parent(self.keys.parent_field(profile, value), raw_bytes(parent))
        return None if old is None else _str(old)

    def parent_unset(self, profile: str, value: str) -> str | None:
        old = self._swap_parent(self.keys.parent_field(profile, value), None)
        return None if old is None else _str(old)

    def parents(self, profile: str) -> dict[str, str]:
        return self._value_fields("", profile, self.keys.parents)

    def _renew_live_version(self, pipe: Any) -> None:
        """Queue a new token for the live version (``Keys.LIVE_VERSION`` in the counts
        hash) on ``pipe``, in the transaction that changes a parent or a live limit: the
        library's plans built before it are stale then, and built again on their next
        call."""
        pipe.hset(self.keys.counts, self.keys.LIVE_VERSION, _live_token())

    def _swap_parent(self, field: str, new: bytes | None) -> Any:
        """Set (None: remove) one live parent, in a transaction with a new token for the
        live version (``Keys.LIVE_VERSION`` in the counts hash): the library's plans
        built before are stale then. Returns the previous parent."""
        client = self.client
        parents = self.keys.parents

        def swap() -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.hget(parents, field)
            if new is None:
                pipe.hdel(parents, field)
            else:
                pipe.hset(parents, field, new)
            self._renew_live_version(pipe)
            return pipe.execute()[0]

        return self._run(swap)

    def _value_fields(self, marker: str, profile: str, key: str | None = None
                      ) -> dict[str, str]:
        """Every value's field of one kind (``L|`` live max; ``""`` in :attr:`Keys.parents`,
        a parent) of a profile, by value."""
        client = self.client
        pattern = marker + self.keys.value_pattern(profile)
        plen = len(marker) + len(profile) + 1
        where = key or self.keys.counts
        rows = self._run(lambda: list(client.hscan_iter(where, match=pattern, count=1000)))
        return {value_from_key(_str(f)[plen:]): _str(v) for f, v in rows}

    def _swap_live(self, profile: str, value: str, item: str, new: str | None) -> str | None:
        """Set (None: remove) one item of a value's live limits (its ``L|`` field: the
        live max, item ``""``, then the rate and window caps, ``,R=<max>:<per
        ms>:<burst>`` and ``,<per>=<max>`` items: one field, so that the admit reads a
        value's live limits with one field of its ``HMGET``); returns the item's
        previous value. The live version (``Keys.LIVE_VERSION``) gets a new token in the
        same step: the library's plans keep their members' live limits, and are built
        again on the next call after any change. A changed rate starts afresh: the
        value's rate state (its theoretical arrival time) is dropped in the same step, so
        no debt run up under another rate carries over; its windows stay.

        One script does it inside Redis (``lua/live_limits.lua``): every admit writes the
        counts hash, so a WATCHed read and write of it would be retried for as long as
        calls keep coming."""
        keys = self.keys
        args = ["swap", keys.limit_field(profile, value), keys.LIVE_VERSION,
                _live_token(), item, "0" if new is None else "1", new or "",
                keys.state_field(profile, value)]
        old = self._run(lambda: self._live_script()(keys=[keys.counts], args=args))
        return None if old is None else _str(old)

    def _live_script(self) -> Any:
        """``lua/live_limits.lua`` on this process's client (EVALSHA, loaded on a miss)."""
        return self.client.register_script(_LIVE_LIMITS_LUA)

    def rate_limit_set(self, profile: str, value: str, rate: Rate | None) -> Rate | None:
        old = self._swap_live(profile, value, "R", None if rate is None else
                              f"{rate.max}:{rate.per_ms}:{rate.burst}")
        if old is None:
            return None
        mx, per, burst = (int(x) for x in old.split(":"))
        return Rate(mx, per, burst)

    def calls_limit_set(self, profile: str, value: str, per: str, maximum: int | None
                        ) -> int | None:
        old = self._swap_live(profile, value, per, None if maximum is None else str(maximum))
        return None if old is None else int(old)

    def usage(self, profile: str, value: str | None) -> Usage:
        client = self.client
        policy = self._policy
        now = self.now_ms()
        entry = (policy.limit_at(profile, self._clock.minute_of_week(now), value)
                 if policy is not None else None)

        def read() -> list[Any]:
            fields = [self.keys.state_field(profile, value)]
            if value is not None:
                fields.append(self.keys.limit_field(profile, value))
            return list(client.hmget(self.keys.counts, fields))

        raw = self._run(read)
        tat, *parts = str(raw[0] or "").split("|")  # the library's state field
        live = _live_items(None if len(raw) < 2 or raw[1] is None else _str(raw[1]))
        live_rate = Rate(*(int(x) for x in live["R"].split(":"))) if "R" in live else None
        windows = {}
        for part in parts:
            per, _, counted = part.partition("=")
            wid, _, n = counted.partition(":")
            windows[per] = (int(wid), int(n))
        return usage_of(entry, live_rate, int(tat or 0), windows, self._clock, now)

    # -- call records
    def call_records(self, count: int = 100, after: str = "") -> list[CallRecord]:
        client: Any = self.client
        start = f"({after}" if after else "-"
        rows: list[tuple[bytes, dict[bytes, bytes]]] = self._run(
            lambda: client.execute_command("XRANGE", self.keys.cdr, start, "+", "COUNT", count,
                                           NEVER_DECODE=True))
        return [_record(rid, fields, self._sources) for rid, fields in rows]

    # -- the fraud guard
    def fraud_events(self, count: int = 100, after: str = "") -> list[FraudEvent]:
        """The last ``count`` fraud events, oldest first; with ``after`` (an event id),
        the first ``count`` after it."""
        client: Any = self.client
        key = self.keys.fraud_events
        if after:
            rows = self._run(lambda: client.xrange(key, f"({after}", "+", count=count))
        else:
            rows = list(reversed(self._run(lambda: client.xrevrange(key, "+", "-",
                                                                    count=count))))
        return [FraudEvent.from_fields(_str(rid), {_str(k): _str(v) for k, v in f.items()})
                for rid, f in rows]

    def fraud_blocks(self) -> list[FraudBlock]:
        """The values blocked now, by rule."""
        client: Any = self.client
        now = self.now_ms()
        rows = self._run(lambda: client.zrangebyscore(self.keys.fraud_blocks, f"({now}",
                                                      "+inf", withscores=True))
        out = []
        for member, till in rows:
            rule, _, enc = _str(member)[2:].partition(":")
            out.append(FraudBlock(rule, value_from_key(enc), int(till)))
        return sorted(out, key=lambda b: (b.rule, b.value))

    def fraud_lift(self, rules: Sequence[str], value: str) -> list[str]:
        """Lift the blocks of ``value`` by these rules; returns the rules that had one
        in force."""
        client: Any = self.client
        now = self.now_ms()
        fields = [self.keys.fraud_field("B", rule, value) for rule in rules]
        if not fields:
            return []

        def lift() -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.hmget(self.keys.counts, fields)
            pipe.hdel(self.keys.counts, *fields)
            pipe.zrem(self.keys.fraud_blocks, *fields)
            return list(pipe.execute())

        till = self._run(lift)[0]
        return [rule for rule, t in zip(rules, till, strict=True)
                if t is not None and int(t) > now]

    def fraud_states(self, rule: str) -> dict[str, FraudState]:
        """A rule's statistics per value in their current windows."""
        client = self.client
        now = self.now_ms()
        policy = self._policy
        rules = {r.name: r for r in policy.fraud} if policy is not None else {}
        fr = rules.get(rule)
        # the rule's counts are kept in the state of the first rule counting the same
        # calls (model.shared_counts); its short calls and levels in fields of its own
        owner = shared_counts(tuple(rules.values()))[rule].name if fr is not None else rule

        def scan(pattern: str) -> list[tuple[Any, Any]]:
            return list(self._run(lambda: list(client.hscan_iter(
                self.keys.counts, match=pattern, count=1000))))

        rows = scan("F*|" + self.keys.value_pattern(rule))
        if owner != rule:
            rows += scan("F|" + self.keys.value_pattern(owner))
        by_value: dict[str, dict[str, str]] = {}
        for f, v in rows:
            kind, _, rest = _str(f).partition("|")
            name, _, enc = rest.partition(":")
            if (kind, name) in (("F", owner), ("Fs", rule), ("Fl", rule)):
                by_value.setdefault(enc, {})[kind] = _str(v)
        out: dict[str, FraudState] = {}
        for enc, fields in by_value.items():
            st = FraudState.from_fields(fields.get("F"), fields.get("Fs"), fields.get("Fl"),
                                        now)
            if st is not None:
                out[value_from_key(enc)] = st.watched(fr.stats) if fr is not None else st
        return out

    def fraud_counts(self) -> dict[tuple[str, str, str], int]:
        """The fraud events per (rule, level, statistic), cluster-wide."""
        client: Any = self.client
        raw = self._run(lambda: client.hgetall(self.keys.fraud_counts))
        out: dict[tuple[str, str, str], int] = {}
        for k, v in raw.items():
            parts = _str(k).split("|")
            if len(parts) == 3:
                out[(parts[0], parts[1], parts[2])] = int(v)
        return out

    def attempts(self, since_ms: int = 0, until_ms: int | None = None, count: int = 1000,
                 after: str = "") -> list[Attempt]:
        client: Any = self.client
        start = f"({after}" if after else str(since_ms) if since_ms > 0 else "-"
        end = "+" if until_ms is None else str(until_ms)
        rows: list[tuple[bytes, dict[bytes, bytes]]] = self._run(
            lambda: client.execute_command("XRANGE", self.keys.attempts, start, end,
                                           "COUNT", count, NEVER_DECODE=True))
        return [_attempt(rid, fields, self._sources) for rid, fields in rows]

    # -- nodes
    def tick(self, node: str, lease_ms: int, sweep: bool, start: bool = False, *,
             skew_ms: float | None = None, epoch: str = "", instance: str = "",
             renew_ms: int = 0) -> TickResult:
        """A node's periodic duties in one call: renew its lease (``lease_ms`` > 0; as
        ``instance``, with ``renew_ms`` its renew interval), with ``start`` end its earlier
        dialogs (unless another live instance holds the node: ``owner``), with ``sweep``
        end dialogs of lost nodes, end dialogs past their deadline (each a bounded batch);
        keep the node's measured clock skew; the epoch op (see :meth:`_load_library`)."""
        r = self._fcall("tick", [key_part(node) if node else "", lease_ms,
                                 "start" if start else "renew", 1 if sweep else 0,
                                 TICK_BATCH, self.clock_offset_ms,
                                 "" if skew_ms is None else str(round(skew_ms)), epoch,
                                 instance, renew_ms], periodic=True)
        out = TickResult(int(r[0]), int(r[1]), int(r[2]), str(r[4]), str(r[5]), r[6] == 1)
        if out.epoch:
            self.epoch = out.epoch
        return out

    def info(self) -> StoreInfo:
        """The loaded library's hash, the store's clock (this process's offset to it is
        measured here), the state epoch and the server's run id; raises StoreError."""
        t0 = time.time()
        try:
            r = self._fcall("read", ["info", 0], load=False, periodic=True)
        except StoreError as e:
            if "function not found" not in str(e).lower():
                raise
            client = self.client
            t0 = time.time()
            raw = self._run(lambda: client.execute_command("TIME"))
            t1 = time.time()
            now = int(raw[0]) * 1000 + int(raw[1]) // 1000
            return StoreInfo(None, now, "", "", "", (t0 + t1) * 500 - now, (t1 - t0) * 1000)
        t1 = time.time()
        now = int(r[4])
        return StoreInfo(str(r[0]), now, str(r[5]), str(r[6]), str(r[7]),
                         (t0 + t1) * 500 - now, (t1 - t0) * 1000)

    def deadline_ms(self, budget_ms: int | None = None) -> int:
        """When a request sent now stops being waited for, in the store's clock:
        this process's clock, less its measured skew, plus ``budget_ms`` (default the
        store's timeout)."""
        budget = self.timeout_ms if budget_ms is None else budget_ms
        return int(time.time() * 1000 - self.clock_skew_ms) + self.clock_offset_ms + budget

    def nodes(self) -> dict[str, int]:
        client = self.client
        rows = self._run(lambda: client.zrange(self.keys.nodes, 0, -1,
                                               withscores=True))
        return {value_from_key(n): int(score) for n, score in rows}

    def node_skews(self) -> dict[str, tuple[int, int]]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.skew))
        out = {}
        for node, v in raw.items():
            skew, _, at = v.partition(":")
            try:
                out[value_from_key(node)] = (int(float(skew)), int(at or 0))
            except ValueError:
                continue
        return out

    def node_dialogs(self, node: str) -> list[str]:
        client = self.client
        key = self.keys.node(node)
        return list(self._run(lambda: client.zrange(key, 0, -1)))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError, StoreError):
            return False

    def close(self) -> None:
        if self._control is not None:
            if self._control_pid == os.getpid():
                self._control.close()
            self._control = None
        for local in (self._local, self._periodic):
            if local.conn is not None:
                if local.pid == os.getpid():
                    local.conn.disconnect()
                local.conn = None
        if self._client is not None:
            self._client.close()
            self._client = None


def _live_items(text: str | None) -> dict[str, str]:
    """The items of a value's live limits (its ``L|`` field, ``<max>,R=...,<per>=...``):
    ``""`` -> its live max (absent: none), ``R`` -> ``max:per:burst``, ``<per>`` -> max."""
    if not text:
        return {}
    head, *rest = text.split(",")
    out: dict[str, str] = {"": head} if head else {}
    for item in rest:
        k, eq, v = item.partition("=")
        if eq:
            out[k] = v
    return out


def _live_token() -> str:
    """A new token for the live version (``Keys.LIVE_VERSION``)."""
    return uuid.uuid4().hex


def _live_max(text: str | None) -> int | None:
    """The live max of a value's live limits field (None: none)."""
    mx = _live_items(text).get("")
    return None if mx is None else int(mx)


def store_error(e: BaseException) -> StoreError:
    """The :class:`StoreError` of a Redis failure: marked ``late`` when the library
    refused a request that came after its caller's deadline (nothing was written), and
    ``maybe_applied`` when no reply came (the request may have been, or yet be, applied)."""
    out = StoreError(f"{type(e).__name__}: {redact(str(e))}")
    out.late = str(e).startswith("POLICER late")  # redis-py's or hiredis's error reply
    out.maybe_applied = isinstance(e, redis.TimeoutError | redis.ConnectionError | OSError)
    return out


def _not_loaded(namespace: str) -> StoreError:
    return StoreError(f"Function not found: Redis has no policy library for namespace "
                      f"{namespace!r} (run `policer load`, or start a proxy of that policy)")


def _not_loaded_inline(library: Library) -> StoreError:
    return StoreError(f"Function not found: Redis has no policy library for namespace "
                      f"{library.namespace!r}, and this one ({len(library.text)} bytes) is "
                      "too big to load inside a decision: the node's tick loads it (or run "
                      "`policer load`)")


def _retry_load(e: Exception) -> bool:
    """A FUNCTION LOAD worth trying again: the connection failed or timed out, or
    Redis was busy or ran out of its 500 ms to run the library's top level."""
    if isinstance(e, redis.ResponseError):
        text = str(e).lower()
        return "timeout" in text or "busy" in text or "loading" in text
    return True


def _load_command(library: Library) -> tuple[Any, ...]:
    return ("FUNCTION", "LOAD", "REPLACE", library.text)


def _epoch_args(epoch: str, clock_offset_ms: int = 0) -> tuple[Any, ...]:
    """ARGV of ``policer_tick_S`` for its epoch op alone."""
    return ("", 0, "epoch", 0, 0, clock_offset_ms, "", epoch)


def _windows(text: str) -> tuple[tuple[str, int, int], ...]:
    out = []
    for item in text.split("\n"):
        if item:
            per, count, mx = item.split(":")
            out.append((per, int(count), int(mx)))
    return tuple(out)


_R = protocol.ADMIT_REPLY
_ROW = protocol.EXPLAIN_ROW


def call_result(r: list[Any]) -> CallResult:
    """The :class:`CallResult` of an admit's reply (``ADMIT_REPLY``, then explain's rows)."""
    a = _R.decode(r)
    rows: list[ExplainRow] = []
    for i in range(len(_R), len(r) - len(_ROW) + 1, len(_ROW)):
        x = _ROW.decode(r[i:i + len(_ROW)])
        enc = str(x["value"])
        rows.append(ExplainRow(
            profile=str(x["profile"]), value=value_from_key(enc) if enc else None,
            count=int(x["count"]), max=int(x["max"]), effective_max=int(x["effective_max"]),
            live_limit=x["live_limit"] == 1, shadow=x["shadow"] == 1,
            would_trip=x["would_trip"] == 1, rate_owed=int(x["rate_owed"]),
            rate_burst=int(x["rate_burst"]), windows=_windows(str(x["windows"])),
            kind=str(x["kind"])))
    retry = int(a["retry_after"])
    md = int(a["max_duration"])
    return CallResult(
        admitted=a["admitted"] == 1, code=int(a["code"]), reason=str(a["reason"]),
        retry_after=None if retry < 0 else retry, limit=str(a["limit"]) or None,
        count=int(a["count"]), max=int(a["max"]), bypass=a["bypass"] == 1,
        duplicate=a["duplicate"] == 1, shadow=int(a["shadow"]) > 0,
        number_class=str(a["number_class"]) or None,
        memberships=tuple(label_from_key(x) for x in str(a["memberships"]).split("\n") if x),
        dialog_id=str(a["dialog_id"]), emergency=a["emergency"] == 1, rows=tuple(rows),
        kind=str(a["kind"]), window=str(a["window"]), max_duration_ms=md if md > 0 else None,
        direction=str(a.get("direction", "")) or None, egress=admit_egress(a))


def admit_egress(a: dict[str, Any]) -> EgressResult | None:
    """The call's first gateway as its admit decided it (``ADMIT_REPLY``'s egress
    fields), None: not decided."""
    taken = int(a.get("egress", -1))
    if taken < 0:
        return None
    if taken == 1:
        return EgressResult(True, 200, "OK", None, None, 0, -1, "", (), True)
    retry = int(a["egress_retry_after"])
    return EgressResult(
        False, int(a["egress_code"]), str(a["egress_reason"]),
        None if retry < 0 else retry, str(a["egress_limit"]) or None,
        int(a["egress_count"]), int(a["egress_max"]), str(a["egress_kind"]), (), True)


def egress_result(r: list[Any]) -> EgressResult:
    """The :class:`EgressResult` of an egress reply (``EGRESS_REPLY``)."""
    a = protocol.EGRESS_REPLY.decode(r)
    retry = int(a["retry_after"])
    return EgressResult(
        taken=a["taken"] == 1, code=int(a["code"]), reason=str(a["reason"]),
        retry_after=None if retry < 0 else retry, limit=str(a["limit"]) or None,
        count=int(a["count"]), max=int(a["max"]), kind=str(a["kind"]),
        memberships=tuple(label_from_key(x) for x in str(a["memberships"]).split("\n") if x),
        known=a["known"] == 1, bypass=a["bypass"] == 1, shadow=a["shadow"] == 1)


def decisions_from(raw: dict[str, str]) -> dict[tuple[str, str], int]:
    """Decisions per (result, profile) from the decisions hash
    (``<kind>;<result>|<profile>,...`` -> count)."""
    out: dict[tuple[str, str], int] = {}
    for k, v in raw.items():
        _, _, parts = k.partition(";")
        for part in parts.split(","):
            if part:
                result, _, profile = part.partition("|")
                out[(result, profile)] = out.get((result, profile), 0) + int(v)
    return out


def stats_from(stats: dict[str, str], decisions: dict[str, str]) -> dict[str, int]:
    """The counters of :data:`STATS_FIELDS` (but the live ones) from the stats and
    decisions hashes."""
    out = {"processed": 0, "rejected": 0, "bypassed": 0, "shadow_rejected": 0,
           "recorded": 0, "ended": 0, "expired": 0, "failed": 0,
           "nodes_lost": int(stats.get("nodes_lost", 0))}
    for k, v in decisions.items():
        n = int(v)
        kind, _, parts = k.partition(";")
        if kind == "rejected":
            out["rejected"] += n
            continue
        if kind == "egress":  # a gateway full for an admitted call: no decision of its own
            continue
        out["processed"] += n
        if kind == "recorded":
            out["recorded"] += n
        if "bypassed|" in parts:
            out["bypassed"] += n
        if "shadow_rejected|" in parts:
            out["shadow_rejected"] += n
    for k, v in stats.items():
        if k.startswith("ended:"):
            reason, n = k[6:], int(v)
            out["ended"] += n
            if reason == "expired":
                out["expired"] += n
            if reason in ("failed", "cancel"):
                out["failed"] += n
    return out


def _str(v: object) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


def _labels(members: bytes) -> tuple[str, ...]:
    """A record's memberships as shown (profile, profile=value) from its count fields."""
    return tuple(label_from_key(f.replace(":", "=", 1))
                 for f in members.decode("utf-8", "replace").split(",") if f)


def _tail_info(rec: Mapping[str, bytes], sources: Sequence[str]) -> dict[str, str]:
    """call_id, from, to (the dialled number), class, node, source_ip of a record (its
    packed tail read with the attribute sources it was packed by); empty ones left out."""
    got = unpack_fields(rec.get("tail", b""), 0, 1)
    out: dict[str, str] = {}
    if got is not None:
        out["call_id"] = _str(got[0][0])
        values = unpack_values(rec["tail"][got[1]:], sources)
        user, domain = values.get("from_user", ""), values.get("from_domain", "")
        out["from"] = f"{user}@{domain}" if domain else user
        out["to"] = values.get(sources[0], "") if sources else ""
        out["source_ip"] = values.get("source_ip", "")
    out["class"] = _str(rec.get("class", b""))
    out["node"] = value_from_key(_str(rec.get("node", b"")))
    return {k: v for k, v in out.items() if v}


def _sources_of(names: bytes | str) -> list[str]:
    return [x for x in _str(names).split(",") if x]


def _dialog_info(dialog_id: str, raw: bytes, variables: Mapping[bytes, bytes],
                 sources: Sequence[str] | None = None) -> DialogInfo | None:
    """A dialog as shown, from its record; None for what is no dialog to show (rejected,
    void, the release of a dialog the store did not know)."""
    rec = unpack_record(raw)
    if rec is None or rec["state"] in (b"rejected", b"void", b"gone") or not rec["decision"]:
        return None
    state = _str(rec["state"])
    ended = state == "ended"
    return DialogInfo(
        dialog_id=dialog_id,
        state=state,
        init_ms=int(rec["init"] or 0),
        start_ms=int(rec["start"] or 0),
        end_ms=int(rec["deadline"] or 0) if ended else 0,
        deadline_ms=0 if ended else int(rec["deadline"] or 0),
        profiles=_labels(rec["members"]),
        info=_tail_info(rec, sources or ()),
        variables={_str(k): _str(v) for k, v in variables.items()},
        end_reason=_str(rec["reason"]),
    )


def _attempt(record_id: bytes | str, raw: dict[bytes, bytes],
             sources_of: Callable[[bytes], list[str]]) -> Attempt:
    """An entry of the attempts stream (``lua/lib/decide.lua``, ``P attempts``: d, a the
    attempt's fields (ATTEMPT), x the packed Call-ID and attributes); ``sources_of``:
    the attribute sources of a signature."""
    head = dict(zip(ATTEMPT.fields, raw.get(b"a", b"").split(b"|", len(ATTEMPT) - 1),
                    strict=False))
    r = head.get("result", b"a")
    sources = sources_of(head.get("sig", b""))
    tail = raw.get(b"x", b"")
    got = unpack_fields(tail, 0, 1)
    attrs = tail[got[1]:] if got is not None else b""
    info = _tail_info({"tail": tail, "class": head.get("class", b""),
                       "node": head.get("node", b"")}, sources)
    return Attempt(
        time_ms=int(head.get("time") or 0),
        dialog_id=_str(raw.get(b"d", b"")),
        admitted=r != b"j",
        recorded=r == b"f",
        code=int(head.get("code") or 200),
        limit=_str(head.get("limit", b"")),
        kind=_str(head.get("kind", b"")),
        info=info,
        attributes=unpack_values(attrs, sources),
        record_id=_str(record_id),
    )


def _unpack_vars(packed: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(packed):
        got = unpack_fields(packed, pos, 2)
        if got is None:
            break
        (k, v), pos = got
        out[_str(k)] = _str(v)
    return out


def _record(record_id: bytes | str, raw: Mapping[bytes, bytes],
            sources_of: Callable[[bytes], list[str]]) -> CallRecord:
    """A call-end record (``P cdr``: d, r reason, e end, x the dialog's record as it was
    when it ended, a when it was answered when the record does not show it yet, v its
    variables); ``sources_of``: the attribute sources of a signature."""
    rec = unpack_record(raw.get(b"x", b"")) or {}
    info = _tail_info(rec, sources_of(rec.get("sig", b"")))
    return CallRecord(
        dialog_id=_str(raw.get(b"d", b"")),
        call_id=info.get("call_id", ""),
        from_uri=info.get("from", ""),
        to_uri=info.get("to", ""),
        setup_ms=int(rec.get("init", b"0") or 0),
        answer_ms=int(raw.get(b"a") or rec.get("start") or 0),
        end_ms=int(raw.get(b"e", b"0") or 0),
        reason=_str(raw.get(b"r", b"")),
        node=info.get("node", ""),
        profiles=_labels(rec.get("members", b"")),
        variables=_unpack_vars(raw.get(b"v", b"")),
        record_id=_str(record_id),
    )
