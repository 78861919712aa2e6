"""Processes a tool or a test starts in a process group of its own
(``start_new_session=True``) and stops whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

__all__ = ["stop_group"]


def stop_group(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """Stop ``proc`` and every process of its group: SIGTERM, then SIGKILL after
    ``timeout`` seconds; what is left of the group is killed either way."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
