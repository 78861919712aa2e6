"""Processes a tool or a test starts in a process group of its own
(``start_new_session=True``) and stops whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

__all__ = ["stop_group"]


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
