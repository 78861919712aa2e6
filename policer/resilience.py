"""Keeping decisions fast and state whole while the store fails.

- :class:`CircuitBreaker`: after ``threshold`` failures in a row, calls go
  straight to the fallback (no timeout paid per call); every
  ``probe_interval`` seconds one call is let through to probe the store, and
  the first success closes the breaker. No thread: the probe rides on a real
  call, so it works the same inside Kamailio's worker processes.
- :class:`PendingQueue`: store operations that could not be applied
  (releases, confirms, and the recording of calls admitted by the fallback),
  kept in order, bounded; the oldest are dropped (and counted) when it is
  full. Deadlines still clean up whatever was dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

from policer.store.base import Op

__all__ = ["CircuitBreaker", "Pending", "PendingQueue"]


class CircuitBreaker:
    """Closed → (threshold failures) → open → (probe succeeds) → closed."""

    def __init__(self, threshold: int = 3, probe_interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.probe_interval = probe_interval
        self._clock = clock
        self._failures = 0
        self._open_since: float | None = None
        self._next_probe = 0.0
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self._open_since is not None

    def allow(self) -> bool:
        """May this call use the store? (Closed, or the probe is due.)"""
        if self._open_since is None:
            return True
        with self._lock:
            now = self._clock()
            if now >= self._next_probe:
                self._next_probe = now + self.probe_interval
                return True
            return False

    def success(self) -> bool:
        """Record a success; True when this closed an open breaker."""
        was_open = self._open_since is not None
        self._failures = 0
        self._open_since = None
        return was_open

    def failure(self) -> bool:
        """Record a failure; True when this opened the breaker."""
        with self._lock:
            self._failures += 1
            now = self._clock()
            if self._open_since is None and self._failures >= self.threshold:
                self._open_since = now
                self._next_probe = now + self.probe_interval
                return True
            if self._open_since is not None:
                self._next_probe = now + self.probe_interval
            return False


#: One store operation waiting for the store: a dialog event, or a batch a proxy
#: packed in the decision function's format.
Pending = Op | bytes


class PendingQueue:
    """A bounded FIFO of :data:`Pending` operations (thread-safe)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.maxlen = maxlen
        self._q: deque[Pending] = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._q)

    def push(self, item: Pending) -> bool:
        """Queue an operation; False when the oldest had to be dropped for it."""
        with self._lock:
            dropped = False
            while len(self._q) >= self.maxlen:
                self._q.popleft()
                self.dropped += 1
                dropped = True
            self._q.append(item)
            return not dropped

    def drain(self, apply: Callable[[list[Pending]], object], limit: int,
              batch: int = 200) -> int:
        """Apply up to ``limit`` operations in order, ``batch`` at a time. ``apply``
        raising stops the drain and keeps that batch at the head. Returns how many
        were applied."""
        done = 0
        while done < limit:
            with self._lock:
                items = list(itertools.islice(self._q, min(batch, limit - done)))
            if not items:
                break
            apply(items)
            with self._lock:
                for item in items:
                    if self._q and self._q[0] is item:
                        self._q.popleft()
            done += len(items)
        return done
