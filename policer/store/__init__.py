"""Stores of dialog profiles: Redis (shared by every proxy) and in-process.

:func:`open_store` picks one from a URL: ``redis://``, ``rediss://``,
``unix://``, ``redis+sentinel://``, ``redis+cluster://`` (Redis, see
:mod:`policer.store.connect` and ``docs/redis.md``) or ``memory://`` (this
process only).
"""

from __future__ import annotations

from policer.policy import Policy
from policer.store.base import (
    AdmitRequest,
    AdmitResult,
    CallRecord,
    CallResult,
    DialogInfo,
    EgressResult,
    Member,
    Op,
    Store,
    StoreError,
)
from policer.store.connect import SCHEMES, parse_store_url, url_scheme
from policer.store.memory_store import MemoryStore
from policer.store.redis_store import RedisStore

__all__ = [
    "AdmitRequest",
    "AdmitResult",
    "CallRecord",
    "CallResult",
    "DialogInfo",
    "EgressResult",
    "Member",
    "MemoryStore",
    "Op",
    "RedisStore",
    "Store",
    "StoreError",
    "open_store",
]


def open_store(url: str, namespace: str, timeout_ms: int = 50,
               policy: Policy | None = None) -> Store:
    """The store a URL names. Connections are opened lazily, per process.

    A malformed URL raises ValueError (its password redacted); a Redis that
    cannot be reached shows later, as StoreError from the store's calls. ``policy``:
    the policy whose function library the store calls (and loads when Redis has none).
    """
    scheme = url_scheme(url)
    if scheme == "memory":
        return MemoryStore(namespace, policy=policy)
    if scheme in ("redis+sentinel", "redis+cluster"):
        parse_store_url(url)  # fail now on a malformed URL, not at the first call
    if scheme in SCHEMES:
        return RedisStore(url, namespace, timeout_ms, policy=policy)
    raise ValueError("unsupported store URL scheme (use redis://, rediss://, unix://, "
                     "redis+sentinel://, redis+cluster:// or memory://)")
