"""Stores of dialog profiles: Redis (shared by every proxy) and in-process.

:func:`open_store` picks one from a URL: ``redis://``, ``rediss://``,
``unix://`` (Redis) or ``memory://`` (this process only).
"""

from __future__ import annotations

from policer.store.base import (
    AdmitRequest,
    AdmitResult,
    CallRecord,
    DialogInfo,
    Member,
    Store,
    StoreError,
)
from policer.store.memory_store import MemoryStore
from policer.store.redis_store import RedisStore

__all__ = [
    "AdmitRequest",
    "AdmitResult",
    "CallRecord",
    "DialogInfo",
    "Member",
    "MemoryStore",
    "RedisStore",
    "Store",
    "StoreError",
    "open_store",
]


def open_store(url: str, namespace: str, timeout_ms: int = 50) -> Store:
    """The store a URL names. Connections are opened lazily, per process."""
    if url.startswith("memory:"):
        return MemoryStore(namespace)
    if url.split(":", 1)[0] in ("redis", "rediss", "unix"):
        return RedisStore(url, namespace, timeout_ms)
    raise ValueError("unsupported store URL scheme (use redis://, rediss://, unix:// or memory://)")
