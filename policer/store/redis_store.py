"""The Redis store: dialog profiles shared by every proxy worker.

Each operation is one Lua script (``policer/store/lua/*.lua``) run with
``EVALSHA`` on a connection of the store's own (see :meth:`RedisStore._eval`);
a ``NOSCRIPT`` answer (restart, failover) loads the script again, transparently.
Connections are opened lazily and per process id, so a store created before a fork (as in
Kamailio, which imports the script before forking its workers) never shares a
socket between processes. Every Redis failure becomes a :class:`StoreError`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from policer.call import key_part, utf8_text, value_from_key
from policer.store.base import (
    STATS_FIELDS,
    AdmitRequest,
    AdmitResult,
    CallRecord,
    DialogInfo,
    Member,
    StoreError,
)
from policer.store.connect import connect
from policer.store.keys import Keys

__all__ = ["RedisStore", "load_lua"]


def _hiredis_packer() -> Any:
    try:
        from hiredis import pack_command
    except ImportError:  # pragma: no cover - hiredis is a dependency
        return None
    return pack_command


_hiredis_pack: Any = _hiredis_packer()

#: Expired entries one admit removes at most (bounds the script's run time).
SWEEP_BATCH = 100
#: Memberships whose admit.lua arguments are remembered (per store; then start over).
MEMBER_CACHE = 4096
#: Dialogs one renew script ends at most (lost nodes, or a restarted node's own).
RENEW_BATCH = 200
#: Call-end records kept in the stream (approximately; ``XADD MAXLEN ~``).
CDR_MAXLEN = 100_000


def _pack(conn: Any, command: tuple[Any, ...]) -> Any:
    """A command in RESP, ready for ``send_packed_command``."""
    if _hiredis_pack is not None:
        return [_hiredis_pack(command)]
    return conn.pack_command(*command)  # pragma: no cover


#: Scripts that use the shared functions of ``lua/lib.lua`` (put in front of them).
_USES_LIB = frozenset({"admit", "release", "renew", "extend"})


@functools.cache
def load_lua(name: str) -> str:
    """The text of one of policer's Lua scripts, as sent to Redis."""
    lua = resources.files("policer.store") / "lua"
    text = (lua / f"{name}.lua").read_text()
    return (lua / "lib.lua").read_text() + text if name in _USES_LIB else text


@functools.cache
def _script_sha(name: str) -> str:
    """What Redis names a script by (``EVALSHA``)."""
    return hashlib.sha1(load_lua(name).encode()).hexdigest()


class _ScriptConnection(threading.local):
    """Per thread: the connection ``_eval`` uses and the process that opened it."""

    conn: Any = None
    pid: int = -1


class RedisStore:
    """Dialog profiles in Redis.

    ``url`` is any redis-py URL (``redis://``, ``rediss://``, ``unix://``);
    ``timeout_ms`` bounds every call (connect and reply). ``clock_offset_ms``
    shifts the store's clock: a testing aid that lets a test jump time forward
    on a real Redis; leave it 0.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        timeout_ms: int = 50,
        *,
        clock_offset_ms: int = 0,
        cdr_maxlen: int = CDR_MAXLEN,
        client_factory: Callable[[], redis.Redis] | None = None,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.timeout_ms = timeout_ms
        self.clock_offset_ms = clock_offset_ms
        self.cdr_maxlen = cdr_maxlen
        self._factory = client_factory
        self._pid = -1
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._local = _ScriptConnection()
        self._member_args: dict[Member, tuple[tuple[str, str], tuple[Any, ...]]] = {}
        self._node_keys: dict[str, str] = {}
        # a Cluster client routes scripts itself (MOVED, ASK): _eval uses redis-py's Script
        self._cluster = url.split(":", 1)[0].lower() == "redis+cluster"
        prefix = self.keys.prefix
        self._p_dialog = prefix + "d:"
        self._p_profile = prefix + "p:"
        self._p_limits = prefix + "l:"
        self._fixed = (self.keys.stats, self.keys.early, self.keys.confirmed, self.keys.decisions)

    # -- connection
    @property
    def client(self) -> redis.Redis:
        """This process's client (a new one after a fork)."""
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            self._client = self._connect()
            self._pid = pid
            self._scripts = {}
        return self._client

    def _connect(self) -> redis.Redis:
        if self._factory is not None:
            return self._factory()
        try:  # every URL form of policer.store.connect; a Cluster client connects at once
            return connect(self.url, self.timeout_ms / 1000)
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"{type(e).__name__}: {_safe(str(e))}") from e

    def script(self, name: str) -> Script:
        s = self._scripts.get(name)
        if s is None:
            s = self.client.register_script(load_lua(name))
            self._scripts[name] = s
        return s

    def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"{type(e).__name__}: {_safe(str(e))}") from e

    def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of policer's scripts: ``EVALSHA`` on this thread's own connection.

        The hot path skips redis-py's pool and command machinery (taking a pooled
        connection polls the socket, and command packing checks every argument):
        that is more than a third of a call's client CPU. One connection per
        process and thread; a ``NOSCRIPT`` answer loads the script and runs it
        again. A connection that broke while idle (Redis restarted, failed over)
        is reopened and the script sent once more: every script is idempotent
        (a dialog id gets the same decision again), and a timeout is never
        retried, so the policy's ``store_timeout`` still bounds the call.
        """
        if self._cluster:  # redis-py's Script: routed to the slot's node, NOSCRIPT reloads
            script, client = self.script(name), self.client
            return self._run(lambda: script(keys=keys, args=args, client=client))
        local = self._local
        conn = local.conn if local.pid == self._pid_now() else self._new_connection()
        packed = _pack(conn, ("EVALSHA", _script_sha(name), len(keys), *keys, *args))
        loaded = reconnected = False
        try:
            while True:
                reused = conn._sock is not None
                try:
                    conn.send_packed_command(packed, check_health=False)
                    return conn.read_response()
                except NoScriptError:  # Redis restarted or failed over: load, run again
                    if loaded:
                        raise
                    loaded = True
                    conn.send_packed_command(_pack(conn, ("SCRIPT", "LOAD", load_lua(name))),
                                             check_health=False)
                    conn.read_response()
                except redis.ConnectionError:  # broke while idle: reopen once
                    if not reused or reconnected:
                        raise
                    reconnected = True
                    conn.disconnect()
        except (redis.RedisError, OSError) as e:
            raise StoreError(f"{type(e).__name__}: {_safe(str(e))}") from e

    _pid_now = staticmethod(os.getpid)

    def _new_connection(self) -> Any:
        """This process's and thread's connection for scripts (opened on first use)."""
        conn = self.client.connection_pool.make_connection()
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    # -- admission
    def admit_arguments(self, request: AdmitRequest) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``admit.lua`` for a request (also used by the benchmark)."""
        did = request.dialog_id
        keys = [self._p_dialog + did, *self._fixed]
        node = request.node
        if node:  # encoded once: a store serves one node, call after call
            node = self._node_keys.get(node) or self._node_keys.setdefault(node, key_part(node))
        args: list[Any] = [
            did,
            request.early_ms,
            3 if request.record else 2 if request.emergency_bypass else 1 if request.emergency
            else 0,
            len(request.members),
            self.clock_offset_ms,
            SWEEP_BATCH,
            self.keys.prefix,
            node,
            request.lease_ms,
            1 if request.sweep_nodes else 0,
            self.cdr_maxlen,
        ]
        cache = self._member_args
        for m in request.members:
            known = cache.get(m)
            if known is None:
                known = self._member_arguments(m)
            keys += known[0]
            args += known[1]
        for k, v in request.info.items():
            args.append(k)
            args.append(v if v.isascii() else utf8_text(v))  # ASCII needs no cleaning
        return keys, args

    def _member_arguments(self, m: Member) -> tuple[tuple[str, str], tuple[Any, ...]]:
        """One membership's KEYS and ARGV (remembered: members repeat call after call)."""
        pp, pl = self._p_profile, self._p_limits
        shadow = 1 if m.shadow else 0
        if m.value is None:
            known = ((pp + m.profile, pl + m.profile),
                     (m.profile, m.profile, "", m.max, m.reserve, shadow))
        else:
            enc = key_part(m.value)
            known = ((f"{pp}{m.profile}:{enc}", pl + m.profile),
                     (m.profile, f"{m.profile}={enc}", enc, m.max, m.reserve, shadow))
        if len(self._member_args) >= MEMBER_CACHE:
            self._member_args.clear()
        self._member_args[m] = known
        return known

    def admit(self, request: AdmitRequest) -> AdmitResult:
        keys, args = self.admit_arguments(request)
        r = self._eval("admit", keys, args)
        return AdmitResult(
            admitted=r[0] == 1,
            tripped=int(r[1]) - 1,
            count=int(r[2]),
            max=int(r[3]),
            bypass=r[4] == 1,
            duplicate=r[5] == 1,
            shadow=int(r[6]) - 1,
        )

    def confirm(self, dialog_id: str, dialog_ms: int) -> bool:
        return self._extend(dialog_id, "confirm", dialog_ms)

    def refresh(self, dialog_id: str, timeout_ms: int) -> bool:
        return self._extend(dialog_id, "refresh", timeout_ms)

    def _extend(self, dialog_id: str, mode: str, timeout_ms: int) -> bool:
        keys = [self._p_dialog + dialog_id, self.keys.early, self.keys.confirmed]
        r = self._eval("extend", keys, [dialog_id, mode, timeout_ms, self.clock_offset_ms])
        return bool(r == 1)

    def release(self, dialog_id: str, reason: str) -> CallRecord | None:
        r = self._eval("release", [self._p_dialog + dialog_id],
                       [dialog_id, reason, self.clock_offset_ms, self.cdr_maxlen,
                        self.keys.prefix])
        if not r:
            return None
        fields = dict(zip(r[1::2], r[2::2], strict=False))
        return _record(str(r[0]), fields)

    # -- dialog variables
    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        r = self._eval("setvar", [self._p_dialog + dialog_id],
                       ["v:" + utf8_text(name), utf8_text(value)])
        return bool(r == 1)

    def get_var(self, dialog_id: str, name: str) -> str | None:
        client = self.client
        key = self._p_dialog + dialog_id
        v = self._run(lambda: client.hget(key, "v:" + utf8_text(name)))
        return None if v is None else str(v)

    # -- inspection
    def now_ms(self) -> int:
        return int(self._eval("size", [], [self.clock_offset_ms])[-1])

    def _sizes(self, keys: list[str]) -> list[int]:
        r = self._eval("size", keys, [self.clock_offset_ms])
        return [int(x) for x in r[:-1]]

    def dialog(self, dialog_id: str) -> DialogInfo | None:
        client = self.client
        h: dict[str, str] = self._run(lambda: client.hgetall(self._p_dialog + dialog_id))
        if not h or h.get("state") == "rejected":
            return None
        return _dialog_info(dialog_id, h)

    def profile_size(self, profile: str, value: str | None = None) -> int:
        return self._sizes([self.keys.profile(profile, value)])[0]

    def profile_values(self, profile: str) -> dict[str, int]:
        client = self.client
        pattern = self.keys.profile_pattern(profile)
        keys = self._run(lambda: sorted(client.scan_iter(match=pattern, count=1000)))
        if not keys:
            return {}
        sizes = self._sizes(keys)
        plen = len(self.keys.profile(profile)) + 1
        return {value_from_key(k[plen:]): n for k, n in zip(keys, sizes, strict=True) if n > 0}

    def profile_list(self, profile: str, value: str | None = None) -> list[DialogInfo]:
        key = self.keys.profile(profile, value)
        now = self.now_ms()
        client = self.client
        ids: list[str] = self._run(lambda: client.zrangebyscore(key, f"({now}", "+inf"))
        if not ids:
            return []

        def fetch() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for did in ids:
                pipe.hgetall(self._p_dialog + did)
            return pipe.execute()

        hashes = self._run(fetch)
        return [_dialog_info(did, h) for did, h in zip(ids, hashes, strict=True) if h]

    def stats(self) -> dict[str, int]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.stats))
        live = self._sizes([self.keys.early, self.keys.confirmed])
        out = {k: 0 for k in STATS_FIELDS}
        for k, v in raw.items():
            if k in out:
                out[k] = int(v)
        out["early"], out["confirmed"] = live
        out["active"] = live[0] + live[1]
        return out

    def ended(self) -> dict[str, int]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.stats))
        return {k[6:]: int(v) for k, v in raw.items() if k.startswith("ended:")}

    def decisions(self) -> dict[tuple[str, str], int]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.decisions))
        out: dict[tuple[str, str], int] = {}
        for k, v in raw.items():
            result, _, profile = k.partition("|")
            out[(result, profile)] = int(v)
        return out

    # -- live limits
    def limit_get(self, profile: str, value: str) -> int | None:
        client = self.client
        v = self._run(lambda: client.hget(self.keys.limits(profile), key_part(value)))
        return None if v is None else int(v)

    def limit_set(self, profile: str, value: str, maximum: int) -> int | None:
        client = self.client
        key, field = self.keys.limits(profile), key_part(value)

        def swap() -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.hget(key, field)
            pipe.hset(key, field, maximum)
            return pipe.execute()[0]

        old = self._run(swap)
        return None if old is None else int(old)

    def limit_unset(self, profile: str, value: str) -> int | None:
        client = self.client
        key, field = self.keys.limits(profile), key_part(value)

        def pop() -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.hget(key, field)
            pipe.hdel(key, field)
            return pipe.execute()[0]

        old = self._run(pop)
        return None if old is None else int(old)

    def limits(self, profile: str) -> dict[str, int]:
        client = self.client
        raw: dict[str, str] = self._run(lambda: client.hgetall(self.keys.limits(profile)))
        return {value_from_key(k): int(v) for k, v in raw.items()}

    # -- call records
    def call_records(self, count: int = 100, after: str = "") -> list[CallRecord]:
        client = self.client
        start = f"({after}" if after else "-"
        rows: list[tuple[str, dict[str, str]]] = self._run(
            lambda: client.xrange(self.keys.cdr, min=start, count=count))
        return [_record(rid, fields) for rid, fields in rows]

    # -- nodes
    def renew(self, node: str, lease_ms: int, sweep: bool, start: bool = False
              ) -> tuple[int, int]:
        r = self._eval("renew", [self.keys.prefix + "nodes"], [
            self.keys.prefix, key_part(node), lease_ms, self.clock_offset_ms, RENEW_BATCH,
            1 if sweep else 0, self.cdr_maxlen, "start" if start else "renew"])
        return int(r[0]), int(r[1])

    def nodes(self) -> dict[str, int]:
        client = self.client
        rows = self._run(lambda: client.zrange(self.keys.prefix + "nodes", 0, -1,
                                               withscores=True))
        return {value_from_key(n): int(score) for n, score in rows}

    def node_dialogs(self, node: str) -> list[str]:
        client = self.client
        key = f"{self.keys.prefix}n:{key_part(node)}"
        return list(self._run(lambda: client.zrange(key, 0, -1)))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError, StoreError):
            return False

    def close(self) -> None:
        if self._local.conn is not None:
            if self._local.pid == os.getpid():
                self._local.conn.disconnect()
            self._local.conn = None
        if self._client is not None:
            self._client.close()
            self._client = None


def _safe(message: str) -> str:
    """An error message without credentials (redis-py may include the URL)."""
    return re.sub(r"(\w+://)[^@/\s]*@", r"\1***@", message)


def _dialog_info(dialog_id: str, h: dict[str, str]) -> DialogInfo:
    return DialogInfo(
        dialog_id=dialog_id,
        state=h.get("state", ""),
        init_ms=int(h.get("init_ms", 0)),
        start_ms=int(h.get("start_ms", 0)),
        end_ms=int(h.get("end_ms", 0)),
        deadline_ms=int(h.get("deadline", 0)),
        profiles=tuple(p for p in h.get("profiles", "").split("\n") if p),
        info={k[2:]: v for k, v in h.items() if k.startswith("i:")},
        variables={k[2:]: v for k, v in h.items() if k.startswith("v:")},
        end_reason=h.get("end_reason", ""),
    )


def _record(record_id: str, f: dict[str, str]) -> CallRecord:
    return CallRecord(
        dialog_id=f.get("dialog_id", ""),
        call_id=f.get("i:call_id", ""),
        from_uri=f.get("i:from", ""),
        to_uri=f.get("i:to", ""),
        setup_ms=int(f.get("init_ms", 0)),
        answer_ms=int(f.get("start_ms", 0)),
        end_ms=int(f.get("end_ms", 0)),
        reason=f.get("reason", ""),
        node=f.get("i:node", ""),
        profiles=tuple(p for p in f.get("profiles", "").split("\n") if p),
        variables={k[2:]: v for k, v in f.items() if k.startswith("v:")},
        record_id=record_id,
    )
