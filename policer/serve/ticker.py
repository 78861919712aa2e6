"""The engine's tick in a worker of the decision service: once a second, in a thread of
its own (its store calls wait outside the event loop; the engine is thread-safe)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policer.engine import Engine

__all__ = ["TICK_S", "Ticker"]

#: Seconds between two runs of the engine's tick in each worker.
TICK_S = 1.0


class Ticker:
    """Runs :meth:`Engine.tick` (lease, queued events, clock skew, policy file reload)
    every ``interval`` seconds until stopped."""

    def __init__(self, engine: Engine, interval: float = TICK_S) -> None:
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="policer-tick", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.engine.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
