"""The Redis store: dialog profiles shared by every proxy worker.

Each operation is one Lua script (``policer/store/lua/*.lua``) run with
``EVALSHA``; redis-py's :class:`~redis.commands.core.Script` reloads a script
transparently when Redis answers ``NOSCRIPT`` (restart, failover). Connections
are opened lazily and per process id, so a store created before a fork (as in
Kamailio, which imports the script before forking its workers) never shares a
socket between processes. Every Redis failure becomes a :class:`StoreError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import unquote

import redis
from redis.commands.core import Script

from policer.call import key_part
from policer.store.base import (
    STATS_FIELDS,
    AdmitRequest,
    AdmitResult,
    CallRecord,
    DialogInfo,
    StoreError,
)
from policer.store.keys import Keys

__all__ = ["RedisStore", "load_lua"]

#: Expired members removed per key by one admit (bounds the script's run time).
SWEEP_BATCH = 100
#: Call-end records kept in the stream (approximately; ``XADD MAXLEN ~``).
CDR_MAXLEN = 100_000


def load_lua(name: str) -> str:
    """The text of one of policer's Lua scripts."""
    return (resources.files("policer.store") / "lua" / f"{name}.lua").read_text()


def _clean(value: str) -> str:
    """Any str (including surrogate escapes from non-UTF-8 bytes) as valid UTF-8 text."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
        timeout = self.timeout_ms / 1000
        return redis.Redis.from_url(
            self.url,
            socket_timeout=timeout,
            socket_connect_timeout=max(timeout, 0.05),
            decode_responses=True,
            health_check_interval=0,
            retry_on_timeout=False,
        )

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
        script = self.script(name)
        client = self.client
        return self._run(lambda: script(keys=keys, args=args, client=client))

    # -- admission
    def admit_arguments(self, request: AdmitRequest) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``admit.lua`` for a request (also used by the benchmark)."""
        did = request.dialog_id
        keys = [self._p_dialog + did, *self._fixed]
        args: list[Any] = [
            did,
            request.early_ms,
            0,
            len(request.members),
            self.clock_offset_ms,
            SWEEP_BATCH,
        ]
        bypass = request.emergency_bypass
        pp, pl = self._p_profile, self._p_limits
        for m in request.members:
            if m.value is None:
                keys.append(pp + m.profile)
                keys.append(pl + m.profile)
                args += (m.profile, m.profile, "", m.max, m.reserve, 1 if m.shadow else 0)
            else:
                enc = key_part(m.value)
                keys.append(f"{pp}{m.profile}:{enc}")
                keys.append(pl + m.profile)
                args += (m.profile, f"{m.profile}={enc}", enc, m.max, m.reserve,
                         1 if m.shadow else 0)
        for k, v in request.info.items():
            args += (k, _clean(v))
        if bypass:
            args[2] = 2
        elif request.emergency:
            args[2] = 1
        return keys, args

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
        keys = [self._p_dialog + dialog_id, self.keys.stats, self.keys.early,
                self.keys.confirmed, self.keys.cdr]
        r = self._eval("release", keys, [dialog_id, reason, self.clock_offset_ms,
                                         self.cdr_maxlen])
        if not r:
            return None
        fields = dict(zip(r[1::2], r[2::2], strict=False))
        return _record(str(r[0]), fields)

    # -- dialog variables
    def set_var(self, dialog_id: str, name: str, value: str) -> bool:
        r = self._eval("setvar", [self._p_dialog + dialog_id], ["v:" + _clean(name), _clean(value)])
        return bool(r == 1)

    def get_var(self, dialog_id: str, name: str) -> str | None:
        client = self.client
        key = self._p_dialog + dialog_id
        v = self._run(lambda: client.hget(key, "v:" + _clean(name)))
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
        return {unquote(k[plen:]): n for k, n in zip(keys, sizes, strict=True) if n > 0}

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
        return {unquote(k): int(v) for k, v in raw.items()}

    # -- call records
    def call_records(self, count: int = 100, after: str = "") -> list[CallRecord]:
        client = self.client
        start = f"({after}" if after else "-"
        rows: list[tuple[str, dict[str, str]]] = self._run(
            lambda: client.xrange(self.keys.cdr, min=start, count=count))
        return [_record(rid, fields) for rid, fields in rows]

    def ping(self) -> bool:
        client = self.client
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
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
