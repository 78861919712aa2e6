"""What the engine answers and what it reports: :class:`Decision`, the answer to one
INVITE, and :class:`EngineMetrics`, the protocol the engine reports to
(:class:`policer.metrics.WorkerMetrics` implements it).

This module imports nothing of policer, so the engine, the metrics and the adapters
all depend on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Decision", "EgressAnswer", "EngineMetrics"]


class EgressAnswer(Protocol):
    """May the call be sent to its gateway (the store's ``EgressResult``, carried as
    it is)."""

    @property
    def taken(self) -> bool: ...
    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def retry_after(self) -> int | None: ...
    @property
    def limit(self) -> str | None: ...
    @property
    def count(self) -> int: ...
    @property
    def max(self) -> int: ...
    @property
    def kind(self) -> str: ...

    def as_dict(self) -> dict[str, object]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one INVITE."""

    admitted: bool
    code: int
    reason: str
    retry_after: int | None
    dialog_id: str
    limit: str | None = None  # the profile whose limit tripped (or was bypassed / shadowed)
    count: int = 0
    max: int = -1
    bypass: bool = False  # an emergency call admitted over a limit
    shadow: bool = False  # a shadow limit would have rejected this admitted call
    duplicate: bool = False  # the dialog was decided before; this is that decision
    fallback: bool = False  # the store failed: on_store_error decided
    number_class: str | None = None
    memberships: tuple[str, ...] = ()
    error: str = ""
    kind: str | None = None  # concurrent | rate | calls: the limit that tripped (or shadowed)
    window: str | None = None  # a calls limit's calendar window (1d)
    max_duration: int | None = None  # seconds an answered call may last (None: no cap)
    direction: str | None = None  # where the call comes from (directions), None none
    #: the call's first gateway (its attribute ``gateway``) as the admit decided it:
    #: taken with the call, or full (the call is admitted without it: ask the egress for
    #: the next gateway); None: not decided (no gateway, a duplicate, a rejection, the
    #: fallback)
    egress: EgressAnswer | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "admitted": self.admitted,
            "code": self.code,
            "reason": self.reason,
            "retry_after": self.retry_after,
            "limit": self.limit,
            "count": self.count,
            "max": self.max,
            "bypass": self.bypass,
            "shadow": self.shadow,
            "duplicate": self.duplicate,
            "fallback": self.fallback,
            "dialog_id": self.dialog_id,
            "class": self.number_class,
            "memberships": list(self.memberships),
            "error": self.error,
            "kind": self.kind,
            "window": self.window,
            "max_duration": self.max_duration,
            "direction": self.direction,
            "egress": None if self.egress is None else self.egress.as_dict(),
        }


class EngineMetrics(Protocol):
    """What the engine reports to (``policer.metrics.WorkerMetrics`` implements it)."""

    def decision(self, d: Decision, seconds: float) -> None: ...

    def store_error(self, op: str) -> None: ...

    def pending(self, queued: int, dropped: int) -> None: ...

    def breaker(self, is_open: bool) -> None: ...

    def reload(self, result: str) -> None: ...
