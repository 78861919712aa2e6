"""Policy hot reload.

A :class:`PolicyWatcher` notices that the policy file changed (its mtime,
size or inode: an edit in place or an atomic ``mv``) at most once per
``interval`` seconds, builds and validates the new policy completely, and only
then swaps it into the engine. An invalid file is rejected with its errors
logged and counted; the old policy keeps serving, and the same broken file is
not reported again until it changes.

An engine polls its watcher in :meth:`policer.engine.Engine.tick` (once a second in
Kamailio's timer process), never inside an INVITE's decision. The KEMI flavour's SIP
workers, which have no tick, poll after each dialog event they queue, so no signal
has to reach Python: replace the file and every process picks the new policy up
within about a second of its next tick or dialog event. (The decision itself follows
at once everywhere: a reload replaces the library in Redis, which every proxy calls.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

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
        self.log = get_logger("policer.reload")
        self.reloads = 0
        self.errors = 0

    def poll(self) -> bool:
        """Reload if the file changed; True when a new policy was swapped in."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
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
