"""Policy hot reload.

A :class:`PolicyWatcher` notices that the policy file, or a ``prefixes_file`` list it
names, changed (its mtime, size or inode: an edit in place or an atomic ``mv``) at
most once per ``interval`` seconds, builds and validates the new policy completely,
and only then swaps it into the engine. An invalid file is rejected with its errors
logged and counted; the old policy keeps serving, and the same broken file is not
reported again until it changes.

Reading, compiling and loading a big policy takes seconds (a class of a million
prefixes), and an engine polls its watcher from its tick, which also renews the
node's lease: the work runs in a background thread (a :class:`Job`), and the result
is swapped in whole, atomically, by a later poll. A poll waits for the job at most
``wait`` seconds (0.5 s by default: a small policy is swapped in by the poll that
noticed it, as before), then returns so that the tick goes on. In Kamailio, whose
processes hold Python's GIL between calls into Python, that wait is also what lets
the job run.

An engine polls its watcher in :meth:`policer.engine.Engine.tick` (once a second in
Kamailio's timer process), never inside an INVITE's decision. The KEMI flavour's SIP
workers, which have no tick, poll after each dialog event they queue, so no signal
has to reach Python: replace the file and every process picks the new policy up
within about a second of its next tick or dialog event. (The decision itself follows
at once everywhere: a reload replaces the library in Redis, which every proxy calls.)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from policer.log import get_logger
from policer.policy import Policy, PolicyError, load_policy

__all__ = ["WAIT_S", "Job", "PolicyWatcher"]

#: How long a poll waits for a reload running in the background before it returns.
WAIT_S = 0.5

_Stamp = tuple[int, int, int] | None
T = TypeVar("T")


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Job(Generic[T]):
    """A function run once in a daemon thread; its result (or the exception it raised)
    is kept for whoever polls :meth:`done` and then reads :meth:`result`."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as e:  # handed to the poller, which reports it
            self._error = e
        finally:
            self._done.set()

    def done(self, wait: float = 0.0) -> bool:
        """Whether it finished, waiting at most ``wait`` seconds (the GIL is free
        meanwhile: the job runs)."""
        return self._done.wait(wait) if wait > 0 else self._done.is_set()

    def result(self) -> T:
        """What the function returned; raises what it raised."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class PolicyWatcher:
    """Watches one policy file (and the lists it names) for one engine; call
    :meth:`poll` often, it is cheap.

    ``prepare`` (default: none) turns a valid new policy into what ``apply`` swaps in;
    it runs in the background with the parse (an engine compiles the library and loads
    it into Redis there), and may raise ValueError to refuse the policy. ``apply`` runs
    in the polling thread and must be quick. ``files``: the lists the current policy
    was read from (:attr:`Policy.files`)."""

    def __init__(self, path: str | Path, apply: Callable[[Any], None],
                 interval: float = 1.0, on_result: Callable[[str], None] | None = None,
                 *, prepare: Callable[[Policy], Any] | None = None,
                 files: Iterable[str] = (), wait: float = WAIT_S) -> None:
        self.path = Path(path)
        self.interval = interval
        self.wait = wait
        self._apply = apply
        self._prepare = prepare
        self._on_result = on_result
        self._files = tuple(files)
        self._stamps = self._stamp_all()
        self._next = time.monotonic() + interval
        self._job: Job[Any] | None = None
        self.log = get_logger("policer.reload")
        self.reloads = 0
        self.errors = 0

    @property
    def busy(self) -> bool:
        """A reload is being read, compiled or loaded in the background."""
        return self._job is not None

    def _stamp_all(self) -> dict[str, _Stamp]:
        return {p: _stamp(p) for p in (str(self.path), *self._files)}

    def poll(self, wait: float | None = None) -> bool:
        """Start a reload if a watched file changed, or finish the one running (waiting
        for it at most ``wait`` seconds, default :attr:`wait`); True when a new policy
        was swapped in by this call."""
        wait = self.wait if wait is None else wait
        if self._job is not None:
            return self._finish(wait)
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        stamps = self._stamp_all()
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        self._job = Job(self._work, "policer-reload")
        return self._finish(wait)

    def reload(self) -> bool:
        """Reload now, in this thread; True when the new policy was swapped in."""
        try:
            prepared: Any = self._work()
        except Exception as e:
            return self._failed(e)
        return self._swap(prepared)

    def _work(self) -> Any:
        """The background part: read and validate the files, prepare the swap."""
        policy = load_policy(self.path)
        return (policy, self._prepare(policy) if self._prepare is not None else policy)

    def _finish(self, wait: float) -> bool:
        job = self._job
        assert job is not None
        if not job.done(wait):
            return False
        self._job = None
        try:
            prepared = job.result()
        except Exception as e:
            return self._failed(e)
        return self._swap(prepared)

    def _swap(self, prepared: tuple[Policy, Any]) -> bool:
        policy, ready = prepared
        self._watch(policy.files)
        try:
            self._apply(ready)
        except ValueError as e:  # e.g. a namespace change, which needs a restart
            return self._failed(e)
        self.reloads += 1
        self._result("ok")
        return True

    def _failed(self, e: Exception) -> bool:
        self.errors += 1
        if isinstance(e, PolicyError):
            self._watch(e.files)
            errors = e.errors
        elif isinstance(e, ValueError):
            errors = [str(e)]
        else:  # a bug: reported, and the old policy keeps serving
            errors = [repr(e)]
        self.log.error("policy_reload_failed", source=str(self.path), errors=errors,
                       keeps="the previous policy")
        self._result("error")
        return False

    def _watch(self, files: tuple[str, ...]) -> None:
        """Watch the lists the last read named (a list named for the first time is
        stamped as it is now)."""
        if files != self._files:
            self._files = files
            self._stamps = {p: self._stamps[p] if p in self._stamps else _stamp(p)
                            for p in (str(self.path), *files)}

    def _result(self, result: str) -> None:
        if self._on_result is not None:
            self._on_result(result)
