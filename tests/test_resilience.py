"""The circuit breaker and the queue of operations the store missed
(``policer/resilience.py``), on their own: the breaker's clock is a value the test
moves (in steps binary floats hold exactly), so every probe interval is exact."""

from __future__ import annotations

import pytest

from policer.resilience import CircuitBreaker, Pending, PendingQueue
from policer.store import Op


class Clock:
    """The breaker's clock, moved by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, probe_interval=0.25, clock=clock)


def test_the_breaker_opens_after_threshold_failures_in_a_row(clock: Clock) -> None:
    b = breaker(clock)
    assert not b.open and b.allow()
    assert b.failure() is False
    assert b.failure() is False
    assert not b.open and b.allow()  # two failures: still closed
    assert b.failure() is True  # the third opens it, and says so once
    assert b.open
    assert b.failure() is False  # already open
    assert not b.allow()


def test_an_open_breaker_lets_one_probe_through_per_interval(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    assert not b.allow()
    clock.now += 0.125
    assert not b.allow()  # not yet due
    clock.now += 0.125
    assert b.allow()  # the probe
    assert not b.allow()  # one probe per interval, however many callers ask
    assert not b.allow()
    clock.now += 0.25
    assert b.allow()  # the next interval's probe
    assert not b.allow()


def test_a_successful_probe_closes_the_breaker(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 0.25
    assert b.allow()
    assert b.success() is True  # it closed the breaker
    assert not b.open
    assert all(b.allow() for _ in range(10))  # every call goes to the store again
    assert b.success() is False  # closed already
    # closed afresh: it takes threshold failures in a row to open again
    assert b.failure() is False and b.failure() is False
    assert b.failure() is True


def test_a_failed_probe_reopens_the_breaker_for_another_interval(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 0.25
    assert b.allow()  # the probe goes out...
    clock.now += 0.125  # ...and fails 125 ms later
    assert b.failure() is False
    assert b.open
    clock.now += 0.125
    assert not b.allow()  # due an interval after the probe, but it failed since:
    clock.now += 0.125  # the next probe is an interval after the failure
    assert b.allow()


def test_the_queue_drops_its_oldest_when_full_and_counts_them() -> None:
    q = PendingQueue(maxlen=3)
    ops = [Op("release", f"d{i}", "bye") for i in range(5)]
    assert [q.push(op) for op in ops] == [True, True, True, False, False]
    assert len(q) == 3 and q.dropped == 2
    seen: list[Pending] = []
    assert q.drain(seen.extend, limit=10, batch=2) == 3
    assert seen == ops[2:] and len(q) == 0


def test_a_full_queue_drops_a_record_before_any_release() -> None:
    """A lost release counts a call that is over until its deadline (a ghost); a lost
    record only counts a live call for less: full, the queue gives up records and
    answers first, oldest first, and keeps the rest in order."""
    q = PendingQueue(maxlen=4)
    rec = [Op("record", f"r{i}", 0) for i in range(3)]
    rel = [Op("release", f"d{i}", "bye") for i in range(3)]
    for op in (rel[0], rec[0], rel[1], rec[1]):
        assert q.push(op)
    assert not q.push(rec[2])  # rec[0] goes
    assert not q.push(rel[2])  # rec[1] goes
    assert len(q) == 4 and q.dropped == 2
    seen: list[Pending] = []
    assert q.drain(seen.extend, limit=10, batch=3) == 4
    assert seen == [rel[0], rel[1], rec[2], rel[2]] and len(q) == 0
    for op in rel + rel[:1]:  # only releases left to drop: the oldest goes
        q.push(op)
    assert q.push(Op("release", "late", "bye")) is False
    seen.clear()
    q.drain(seen.extend, limit=10)
    assert [op.dialog_id for op in seen if isinstance(op, Op)] == ["d1", "d2", "d0", "late"]


def test_a_drain_that_fails_keeps_its_batch_at_the_head() -> None:
    q = PendingQueue()
    ops = [Op("confirm", f"d{i}") for i in range(5)]
    for op in ops:
        q.push(op)
    applied: list[Pending] = []

    def apply(items: list[Pending]) -> None:
        if len(applied) >= 2:
            raise RuntimeError("the store failed")
        applied.extend(items)

    with pytest.raises(RuntimeError):
        q.drain(apply, limit=10, batch=2)
    assert applied == ops[:2]
    assert len(q) == 3  # the failed batch and the rest, in order
    rest: list[Pending] = []
    assert q.drain(rest.extend, limit=10, batch=2) == 3
    assert rest == ops[2:]
