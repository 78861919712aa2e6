"""Keeping decisions fast and state whole while the store fails.

- :class:`CircuitBreaker`: after ``threshold`` failures in a row, calls go
  straight to the fallback (no timeout paid per call); every
  ``probe_interval`` seconds one call is let through to probe the store, and
  the first success closes the breaker. No thread: the probe rides on a real
  call, so it works the same inside Kamailio's worker processes.
- :class:`PendingQueue`: store operations that could not be applied
  (releases, confirms, and the recording of calls admitted by the fallback),
  kept in order, bounded; when it is full the oldest operation whose loss leaves
  no ghost call is dropped (and counted): a record or an answer before a release.
  Deadlines still clean up whatever was dropped.
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


#: Queued operations whose loss leaves no ghost call: dropped first when the queue is
#: full. A lost record or answer counts a live call for less (at worst until it ends);
#: a lost release or void would count a call that is over until its deadline.
_SPARE_KINDS = frozenset({"record", "confirm", "refresh", "set_var"})


class PendingQueue:
    """A bounded FIFO of :data:`Pending` operations (thread-safe).

    Full, it drops the oldest operation whose loss leaves no ghost call (a record, an
    answer, a refresh, a variable), and the oldest of all only when every one queued
    ends or settles a call (a release, a void, a proxy's packed batch)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.maxlen = maxlen
        self._q: deque[tuple[int, Pending]] = deque()  # (sequence number, operation)
        self._spare: deque[int] = deque()  # sequence numbers of spare ones, oldest first
        self._gone: set[int] = set()  # dropped from the middle, still in _q
        self._seq = 0
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._q) - len(self._gone)

    def push(self, item: Pending) -> bool:
        """Queue an operation; False when another had to be dropped for it."""
        with self._lock:
            dropped = False
            while len(self._q) - len(self._gone) >= self.maxlen:
                self._drop_one()
                self.dropped += 1
                dropped = True
            self._seq += 1
            self._q.append((self._seq, item))
            if not isinstance(item, bytes) and item.kind in _SPARE_KINDS:
                self._spare.append(self._seq)
            return not dropped

    def _drop_one(self) -> None:
        head = self._head_seq()
        while self._spare:
            seq = self._spare.popleft()
            if seq >= head and seq not in self._gone:
                self._gone.add(seq)
                return
        seq, _ = self._q.popleft()
        self._gone.discard(seq)
        self._trim()

    def _head_seq(self) -> int:
        self._trim()
        return self._q[0][0] if self._q else self._seq + 1

    def _trim(self) -> None:
        while self._q and self._q[0][0] in self._gone:
            self._gone.discard(self._q.popleft()[0])

    def drain(self, apply: Callable[[list[Pending]], object], limit: int,
              batch: int = 200) -> int:
        """Apply up to ``limit`` operations in order, ``batch`` at a time. ``apply``
        raising stops the drain and keeps that batch at the head. Returns how many
        were applied."""
        done = 0
        while done < limit:
            with self._lock:
                self._trim()
                want = min(batch, limit - done)
                picked = [(seq, item) for seq, item in itertools.islice(self._q, want * 2)
                          if seq not in self._gone][:want]
            if not picked:
                break
            apply([item for _, item in picked])
            last = picked[-1][0]
            with self._lock:
                while self._q and self._q[0][0] <= last:
                    self._gone.discard(self._q.popleft()[0])
                while self._spare and self._spare[0] <= last:
                    self._spare.popleft()
            done += len(picked)
        return done
