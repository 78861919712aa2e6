"""A worker's admits: each ``POST /v1/admit`` decided by the engine, its store call
sent on the store's admit pipeline (:mod:`policer.store.pipeline`) from the event loop,
or decided by the fallback, without ever waiting for Redis in the loop."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import NamedTuple

from policer.call import Call
from policer.serve.service import Response, Service, decided, error
from policer.serve.store_thread import Answer, StoreThread
from policer.store import StoreError
from policer.store.base import CallResult
from policer.store.pipeline import Admit, AdmitPipeline, Result, admit_pipeline

__all__ = ["Admits"]

_CIRCUIT_OPEN = "circuit open: the store failed repeatedly"
#: An error reply of a store restoring its counts: nothing was written.
_RECOVERING = "POLICER recovering"


class _Waiting(NamedTuple):
    """An admit read from a client, not answered yet."""

    call: Call
    answer: Answer
    t0: float  # time.perf_counter() when it was read
    deadline: int | None  # when its client stops waiting, the store's clock (None: unsaid)


def _earliest(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _no_reply(message: str) -> StoreError:
    """A store call given up on without its answer: it may have been, or yet be,
    applied (the engine settles a rejection by the fallback)."""
    e = StoreError(message)
    e.maybe_applied = True
    return e


class Admits:
    """A worker's admits. Every admit read in one turn of the loop goes to the store's
    pipeline in one write (Redis reads them together, answers them together); each is
    answered as soon as its reply is read.

    Decided by the engine as :meth:`Engine.admit` does (the same arguments, decision,
    log, metrics, circuit breaker: :meth:`Engine.admit_reply`,
    :meth:`Engine.admit_failed`, :meth:`Engine.fallback`). No admit waits longer than
    the policy's store timeout: a reply later than that, or a lost connection, gives
    every call in flight the ``on_store_error`` decision; while the circuit is open, or
    the pipeline's connection is down and not being opened, the fallback decides at
    once; while it is being opened (every ``RETRY_S`` at most) admits wait for it up
    to the store timeout. A reply that is an error is decided again by
    :meth:`Engine.admit` (which loads the library when Redis lost it) in the store
    thread. A store with no pipeline (Cluster, in-process) has the admits of a turn
    decided in the store thread together (:meth:`Engine.admit_many`, one round trip),
    bounded by the store timeout too."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop,
                 store: StoreThread) -> None:
        self.service = service
        self.engine = engine = service.engine
        self.loop = loop
        self.store = store
        self.batch: list[_Waiting] = []
        self.held: collections.deque[_Waiting] = collections.deque()  # for the pipeline
        self._held_timer: asyncio.TimerHandle | None = None
        self.pipeline: AdmitPipeline | None = admit_pipeline(
            engine.store, engine.node, loop, lambda: service.timeout_s, self._release_held)

    def start(self) -> None:
        """Open the pipeline's connection before the first admit needs it."""
        if self.pipeline is not None:
            self.pipeline.open()

    def add(self, call: Call, answer: Answer, deadline: int | None = None) -> None:
        """An admit to decide: ``answer`` gets its answer (``deadline``: when its client
        stops waiting, the store's clock, if it said)."""
        if not self.batch:
            self.loop.call_soon(self.flush)
        self.batch.append(_Waiting(call, answer, time.perf_counter(), deadline))

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if batch:
            self._dispatch(batch)

    def _dispatch(self, batch: list[_Waiting]) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            self._by_store(batch)
        elif pipeline.ready:
            self._send(pipeline, batch)
        else:
            pipeline.open()
            circuit_open = self.engine.circuit_open
            if pipeline.opening and not circuit_open:
                self.held.extend(batch)
                self._arm_held()
            else:
                self._fallback(batch, None if circuit_open else pipeline.why)

    def _send(self, pipeline: AdmitPipeline, batch: list[_Waiting]) -> None:
        engine = self.engine
        if not engine.store_allowed():  # the circuit is open and no probe is due
            self._fallback(batch, None)
            return
        # each admit carries when this worker stops waiting for it (the store's clock):
        # a request Redis reads later than that (paused, slow) writes nothing
        now = time.perf_counter()
        timeout = self.service.timeout_s
        deadline_ms = engine.store.deadline_ms
        admits = []
        for w in batch:
            deadline = _earliest(w.deadline, deadline_ms(
                max(0, round((w.t0 + timeout - now) * 1000))))
            admits.append(Admit(w.call, deadline, w.t0,
                                functools.partial(self._replied, w, deadline)))
        pipeline.send(admits)

    def _replied(self, w: _Waiting, deadline: int, result: Result) -> None:
        engine = self.engine
        if isinstance(result, CallResult):
            try:
                d = engine.admit_reply(w.call, result, w.t0)
            except Exception as e:  # defensive: never a dropped call
                d = engine.admit_failed(w.call, f"admit: {e!r}", w.t0)
        elif result.maybe_applied or result.late or _RECOVERING in str(result):
            # no reply, or one that says nothing was written: the fallback decides
            d = engine.admit_failed(w.call, result, w.t0, deadline)
        else:
            # another error reply: decided as admit() does, away from the loop (it may
            # load the library)
            self.store.submit(
                [w.answer], lambda: [decided(engine.admit(w.call))],
                lambda: [decided(engine.admit_failed(
                    w.call, _no_reply(self.service.no_answer()), w.t0))])
            return
        w.answer(decided(d))

    def _fallback(self, batch: list[_Waiting], why: str | None) -> None:
        """The ``on_store_error`` decision at once: the store is not asked. ``why``: the
        store's failure (counted once, for the circuit breaker); None: the circuit is
        open (as :meth:`Engine.admit` decides then)."""
        engine = self.engine
        for i, w in enumerate(batch):
            if why is None:
                d = engine.fallback(w.call, _CIRCUIT_OPEN, w.t0)
            elif i == 0:
                d = engine.admit_failed(w.call, why, w.t0)
            else:
                d = engine.fallback(w.call, why, w.t0)
            w.answer(decided(d))

    def _by_store(self, batch: list[_Waiting]) -> None:
        """A store with no pipeline: the admits in the store thread, one round trip."""
        engine = self.engine
        calls = [w.call for w in batch]
        deadline = engine.store.deadline_ms()

        def run() -> list[Response]:
            try:
                decisions = engine.admit_many(calls, deadline)
            except Exception as e:  # never: the engine does not raise; a bug must not hang
                self.service.log.error("request_failed", path="/v1/admit", error=repr(e))
                return [error(500, "internal error") for _ in calls]
            return [decided(d) for d in decisions]

        def late() -> list[Response]:
            why = _no_reply(self.service.no_answer())
            return [decided(engine.admit_failed(w.call, why, w.t0, deadline)) for w in batch]

        self.store.submit([w.answer for w in batch], run, late)

    # -- admits waiting for the pipeline's connection being opened
    def _arm_held(self) -> None:
        if self._held_timer is None and self.held:
            wait = self.held[0].t0 + self.service.timeout_s - time.perf_counter()
            self._held_timer = self.loop.call_later(max(0.0, wait), self._expire_held)

    def _expire_held(self) -> None:
        self._held_timer = None
        now = time.perf_counter()
        timeout = self.service.timeout_s
        late: list[_Waiting] = []
        while self.held and self.held[0].t0 + timeout <= now + 0.001:
            late.append(self.held.popleft())
        if late:
            self._fallback(late, f"TimeoutError: no connection to the store in "
                                 f"{timeout * 1000:.0f} ms")
        self._arm_held()

    def _release_held(self) -> None:
        """The pipeline's connection opened, or the attempt failed: the admits that
        waited for it go."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self.held = list(self.held), collections.deque()
        if held:
            self._dispatch(held)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
