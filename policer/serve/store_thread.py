"""A worker's blocking store calls, in a thread of their own: dialog events, explain,
health, /metrics, /v1/sync, and the admits its pipeline cannot take. The event loop
never waits for Redis."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence

from policer.serve.service import Job, Response, Service, error

__all__ = ["Answer", "StoreThread"]

#: Where a request's answer goes, once decided (called in the event loop, once).
Answer = Callable[[Response], None]


class StoreThread:
    """The blocking store calls of one worker, made one after another in one thread, in
    the order they came (so a client's dialog events reach the store in its order). An
    answer the store has not given within the policy's store timeout is given then by
    the request's ``late`` (the fallback decision, 202 queued, 503), so no client waits
    longer for a stalled store, however many requests wait with it."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policer-store")

    def job(self, answer: Answer, job: Job, path: str, head: bool = False) -> None:
        """One request's job; ``head``: a HEAD request (the answer without its body)."""
        service = self.service

        def run() -> list[Response]:
            r = service.run(job, path)
            return [Response(r.status, b"", r.content_type, r.close) if head else r]

        late = job.late
        self.submit([answer], run, None if late is None else lambda: [late()],
                    job.skip_late)

    def submit(self, answers: Sequence[Answer], run: Callable[[], list[Response]],
               late: Callable[[], list[Response]] | None, skip_late: bool = True) -> None:
        """``run()`` in the store thread gives one response per answer, or ``late()`` in
        the loop does once the store timeout has passed (None: no deadline)."""
        loop = self.loop
        state = _Pending()

        def work() -> list[Response] | None:
            if state.done and skip_late:
                return None  # answered already: the store is not asked
            return run()

        def finish(fut: asyncio.Future[list[Response] | None]) -> None:
            if state.done or fut.cancelled():
                return
            state.done = True
            if state.timer is not None:
                state.timer.cancel()
            try:
                responses = fut.result()
            except Exception as e:  # defensive: run() does not raise
                self.service.log.error("request_failed", error=repr(e))
                responses = [error(500, "internal error") for _ in answers]
            if responses is not None:
                _answer_all(answers, responses)

        def expire(late: Callable[[], list[Response]]) -> None:
            if state.done:
                return
            state.done = True
            try:
                responses = late()
            except Exception as e:  # defensive: never a dropped answer
                self.service.log.error("request_failed", error=repr(e))
                responses = [error(500, "internal error") for _ in answers]
            _answer_all(answers, responses)

        try:
            fut = loop.run_in_executor(self.pool, work)
        except RuntimeError:  # the worker is stopping
            _answer_all(answers, [error(503, "stopping") for _ in answers])
            return
        if late is not None:
            state.timer = loop.call_later(self.service.timeout_s, expire, late)
        fut.add_done_callback(finish)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Pending:
    __slots__ = ("done", "timer")

    def __init__(self) -> None:
        self.done = False  # answered (by the store or late)
        self.timer: asyncio.TimerHandle | None = None


def _answer_all(answers: Sequence[Answer], responses: list[Response]) -> None:
    for answer, response in zip(answers, responses, strict=True):
        answer(response)
