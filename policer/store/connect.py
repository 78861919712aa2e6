"""Redis clients from store URLs: one Redis, Sentinel, or Cluster.

=============================================================================  ==============
URL                                                                            client
=============================================================================  ==============
``redis://[[user]:password@]host:port/db``                                     one Redis
``rediss://[[user]:password@]host:port/db?ssl_ca_certs=…``                     one Redis, TLS
``unix:///path/redis.sock?db=0``                                               one Redis
``redis+sentinel://[[user]:password@]host:port[,host:port…]/SERVICE[/db]``     Sentinel
``redis+cluster://[[user]:password@]host:port[,host:port…]``                   Cluster
=============================================================================  ==============

User and password are percent-decoded. TLS query arguments (``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``,
``ssl_ca_path``) are taken by every form; the Sentinel and Cluster forms turn
TLS on with ``ssl=true`` (``rediss://`` does it for one Redis). The Sentinel
form also takes ``sentinel_username`` and ``sentinel_password`` (the
sentinels' own AUTH; the user and password before ``@`` are the data
nodes'). With TLS on, the sentinels are reached over TLS too.

Every client decodes replies to ``str``, bounds every connect and every reply
by the store timeout, and never retries: a failed or slow call fails at once
and the engine's ``on_store_error`` decides. The Sentinel client asks the
sentinels for the primary on every new connection, so after a failover the
next call reaches the promoted replica; the Cluster client follows ``MOVED``.

No password ever appears in an exception raised here: URL errors name the
URL with :func:`policer.log.redact` applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from policer.log import redact

__all__ = ["SCHEMES", "StoreURL", "connect", "parse_store_url"]

#: URL schemes :func:`connect` accepts.
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")

_BOOL = {"1": True, "true": True, "yes": True, "on": True,
         "0": False, "false": False, "no": False, "off": False}
# untyped in redis-py
_Sentinel: Any = Sentinel
_ClusterNode: Any = ClusterNode
_SSL_STR = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_ca_path")


@dataclass(frozen=True)
class StoreURL:
    """A parsed Sentinel or Cluster URL (the single-Redis forms go to redis-py)."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    service: str = ""
    db: int = 0
    ssl: dict[str, Any] = field(default_factory=dict)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"{redact(url)}: {why}")


def _hosts(url: str, netloc: str) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if part.startswith("["):  # [::1]:26379
            host, _, rest = part[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = part.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _bad(url, f"expected host:port, got {part!r}")
        out.append((host, int(port_text)))
    return tuple(out)


def url_scheme(url: str) -> str:
    """A store URL's scheme, lower-cased ('' when it has none): the one place store URLs
    are told apart (:func:`policer.store.open_store`, :func:`connect`, the Redis
    store's Cluster routing)."""
    scheme, sep, _ = url.partition(":")
    return scheme.lower() if sep else ""


def parse_store_url(url: str) -> StoreURL:
    """Parse a ``redis+sentinel://`` or ``redis+cluster://`` URL (raises ValueError)."""
    # urlsplit refuses several hosts with an IPv6 one among them: split by hand
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis+sentinel", "redis+cluster"):
        raise _bad(url, "not a redis+sentinel:// or redis+cluster:// URL")
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    authority, slash, path_text = rest.partition("/")
    userinfo, at, netloc = authority.rpartition("@")
    if not at:
        userinfo, netloc = "", authority
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # redis://secret@host is a password alone, as redis-py reads it
            username, password = None, unquote(user)
    if not netloc:
        raise _bad(url, "no host:port")
    hosts = _hosts(url, netloc)

    path = [unquote(p) for p in path_text.split("/") if p] if slash else []
    service, db = "", 0
    if scheme == "redis+sentinel":
        if not path or len(path) > 2:
            raise _bad(url, "expected /SERVICE or /SERVICE/DB after the sentinels")
        service = path[0]
        if len(path) == 2:
            if not path[1].isdigit():
                raise _bad(url, f"database must be a number, got {path[1]!r}")
            db = int(path[1])
    elif path and path != ["0"]:
        raise _bad(url, "a cluster URL names no service or database (cluster mode has db 0)")

    ssl: dict[str, Any] = {}
    on = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "ssl":
            if value.lower() not in _BOOL:
                raise _bad(url, f"ssl={value!r}: expected true or false")
            on = _BOOL[value.lower()]
        elif name in _SSL_STR:
            ssl[name] = value
        elif name == "ssl_check_hostname":
            if value.lower() not in _BOOL:
                raise _bad(url, f"ssl_check_hostname={value!r}: expected true or false")
            ssl[name] = _BOOL[value.lower()]
        elif name == "sentinel_password" and scheme == "redis+sentinel":
            sentinel_password = value
        elif name == "sentinel_username" and scheme == "redis+sentinel":
            sentinel_username = value or None
        elif name == "db" and scheme == "redis+sentinel" and value.isdigit():
            db = int(value)
        else:
            raise _bad(url, f"unknown query argument {name!r}")
    if ssl and not on:
        raise _bad(url, "ssl_* arguments need ssl=true")
    if on:
        ssl["ssl"] = True
    return StoreURL(scheme, hosts, username, password, service, db, ssl,
                    sentinel_username, sentinel_password)


def _common(timeout_s: float) -> dict[str, Any]:
    return {
        "decode_responses": True,
        # values from SIP are kept as the proxy sent them: never fail on reading one back
        "encoding_errors": "replace",
        "socket_timeout": timeout_s,
        "socket_connect_timeout": max(timeout_s, 0.05),
        # no retries at all: the engine's fallback decides, fast
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for a store URL; it connects lazily, on its first command.

    The Cluster form returns a :class:`redis.cluster.RedisCluster`, which
    offers every command the store uses (typed as :class:`redis.Redis` for the
    store's sake).
    """
    scheme = url_scheme(url)
    kwargs = _common(timeout_s)
    if scheme in ("redis", "rediss", "unix"):
        try:
            return redis.Redis.from_url(url, **kwargs)
        except ValueError as e:
            raise _bad(url, redact(str(e))) from None
    if scheme not in SCHEMES:
        raise _bad(url, f"unsupported scheme {scheme!r} (use {', '.join(SCHEMES)})")
    u = parse_store_url(url)
    if u.scheme == "redis+sentinel":
        sentinel_kwargs: dict[str, Any] = {**kwargs, **u.ssl}
        if u.sentinel_username:
            sentinel_kwargs["username"] = u.sentinel_username
        if u.sentinel_password:
            sentinel_kwargs["password"] = u.sentinel_password
        sentinel = _Sentinel(list(u.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs, **u.ssl)
        # redis-py's Sentinel-managed connections (TLS ones with ssl=True) ask the
        # sentinels for the primary in connect(), which the store calls on every socket
        primary = sentinel.master_for(
            u.service, redis_class=redis.Redis, db=u.db, username=u.username,
            password=u.password)
        return cast(redis.Redis, primary)
    try:  # a Cluster client asks the startup nodes for the slot map at once
        cluster = RedisCluster(
            startup_nodes=[_ClusterNode(h, p) for h, p in u.hosts],
            username=u.username,
            password=u.password,
            require_full_coverage=False,
            **kwargs,
            **u.ssl,
        )
    except RedisClusterException as e:  # not a RedisError: make it one
        raise redis.ConnectionError(redact(str(e))) from e
    return cast(redis.Redis, cluster)
