"""Policy hot reload.

A :class:`PolicyWatcher` notices that the policy file changed (its mtime,
size or inode: an edit in place or an atomic ``mv``) at most once per
``interval`` seconds, builds and validates the new policy completely, and only
then swaps it into the engine. An invalid file is rejected with its errors
logged and counted; the old policy keeps serving, and the same broken file is
not reported again until it changes. ``SIGHUP`` (for processes that own their
signals, such as ``policer simulate`` or a standalone worker) forces a check at
the next call.

Inside Kamailio every worker process checks for itself on its own calls, so
no signal has to reach Python: replace the file and every worker picks the new
policy up within a second.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policer.log import get_logger
from policer.policy import Policy, PolicyError, load_policy

__all__ = ["PolicyWatcher"]

_Stamp = tuple[int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyWatcher:
    """Watches one policy file for one engine (call :meth:`poll` often; it is cheap)."""

    def __init__(self, path: str | Path, apply: Callable[[Policy], None],
                 interval: float = 1.0, on_result: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.interval = interval
        self._apply = apply
        self._on_result = on_result
        self._stamp = _stamp(self.path)
        self._next = time.monotonic() + interval
        self._forced = False
        self.log = get_logger("policer.reload")
        self.reloads = 0
        self.errors = 0

    def install_sighup(self) -> None:
        """Force a check on SIGHUP (only where this process owns its signals)."""

        def handler(signum: int, frame: Any) -> None:
            self._forced = True
            self._next = 0.0

        signal.signal(signal.SIGHUP, handler)

    def poll(self) -> bool:
        """Reload if the file changed; True when a new policy was swapped in."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        stamp = _stamp(self.path)
        if stamp == self._stamp and not self._forced:
            return False
        self._forced = False
        self._stamp = stamp
        return self.reload()

    def reload(self) -> bool:
        try:
            policy = load_policy(self.path)
            self._apply(policy)
        except PolicyError as e:
            self.errors += 1
            self.log.error("policy_reload_failed", source=str(self.path), errors=e.errors,
                           keeps="the previous policy")
            self._result("error")
            return False
        except ValueError as e:  # e.g. a namespace change, which needs a restart
            self.errors += 1
            self.log.error("policy_reload_failed", source=str(self.path), errors=[str(e)],
                           keeps="the previous policy")
            self._result("error")
            return False
        self.reloads += 1
        self._result("ok")
        return True

    def _result(self, result: str) -> None:
        if self._on_result is not None:
            self._on_result(result)
