"""Processes a tool or a test starts in a process group of its own
(``start_new_session=True``) and stops whole, and waiting for what they do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

__all__ = ["stop_group", "wait_for"]


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds have passed; whether
    it became true. Readiness is waited for this way, never by a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def stop_group(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
               timeout: float = 10) -> None:
    """Stop ``proc`` (started in a session of its own) and every process of its group:
    ``sig``, then SIGKILL after ``timeout`` seconds; what is left of the group (Kamailio's
    workers may outlive the main process for a moment) is killed either way."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
