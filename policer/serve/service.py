"""The routes of the decision service over one engine: what each request means and
answers, with no HTTP server in here (the server reads the request and writes the
:class:`Response`)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policer.call import MAX_VALUE
from policer.decision import Decision
from policer.log import get_logger
from policer.serve.bodies import (
    BadRequest,
    call_from_body,
    call_of,
    client_deadline,
    dialog_id_from_body,
    dumps,
    object_of,
    text,
)
from policer.store import Op, StoreError
from policer.store.base import END_REASONS, CallRecord
from policer.store.keys import dialog_id

if TYPE_CHECKING:  # imported by the caller, after prepare_metrics (prometheus-client)
    from policer.engine import Engine

__all__ = ["JSON", "METRICS", "NOT_FOUND", "Job", "Response", "Service", "decided", "error"]

JSON = b"application/json"
METRICS = b"text/plain; version=0.0.4; charset=utf-8"
_END_REASONS = frozenset(END_REASONS)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    close: bool = False  # close the connection after this answer


def error(status: int, message: str, close: bool = False) -> Response:
    """An error answer: ``{"error": message}``."""
    return Response(status, dumps({"error": message}), close=close)


def decided(d: Decision) -> Response:
    """The answer of an admit: the decision as ``policer admit --json`` prints it."""
    return Response(200, dumps(d.as_dict()))


NOT_FOUND = error(404, "not found")


class Job:
    """The part of a request that asks the store: ``run`` makes the blocking store
    calls and gives the answer (in the worker's store thread,
    :class:`policer.serve.store_thread.StoreThread`); ``late`` gives the answer instead
    when the store has not within the policy's store timeout (None: no deadline).
    ``skip_late``: a job not started by then is not run at all (a question already
    answered); else it runs anyway (a dialog event is applied, or queued by the
    engine, whatever the client was told)."""

    __slots__ = ("late", "run", "skip_late")

    def __init__(self, run: Callable[[], Response], late: Callable[[], Response] | None,
                 skip_late: bool = True) -> None:
        self.run = run
        self.late = late
        self.skip_late = skip_late


class Service:
    """The routes, over one engine. Never raises.

    :meth:`route` answers at once what needs no store (bad requests, unknown paths)
    and hands the rest back as a :class:`Job` the server runs away from its event
    loop; :meth:`handle` runs it on the spot (a server with no store thread)."""

    def __init__(self, engine: Engine, token: str | None = None,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.engine = engine
        self._token = token.encode() if token else None
        self._metrics = metrics
        self.log = get_logger("policer.serve")
        self._post: dict[str, Callable[[bytes], Response | Job]] = {
            "/v1/admit": self.admit,
            "/v1/explain": self.explain,
            "/v1/egress": self.egress,
            "/v1/confirm": self.confirm,
            "/v1/refresh": self.refresh,
            "/v1/release": self.release,
            "/v1/settle": self.settle,
            "/v1/sync": self.sync,
        }
        self._get: dict[str, Callable[[], Response | Job]] = {
            "/v1/health": self.health,
            "/metrics": self.metrics,
        }

    @property
    def timeout_s(self) -> float:
        """How long a store call is waited for: the (current) policy's store timeout."""
        return self.engine.policy.store_timeout_ms / 1000

    def authorized(self, authorization: bytes | None) -> bool:
        """``Authorization: Bearer TOKEN``: the scheme in any case (RFC 9110, 11.1),
        then one or more spaces, then the token, compared exactly in constant time."""
        if self._token is None:
            return True
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "),
                                                                   self._token)

    def route(self, method: str, path: str, body: bytes) -> Response | Job:
        """One request whose credentials were checked (:meth:`authorized`): its answer,
        or the :class:`Job` that gives it."""
        try:
            post = self._post.get(path)
            if post is not None:
                return post(body) if method == "POST" else _method_not_allowed("POST")
            get = self._get.get(path)
            if get is not None:
                return get() if method in ("GET", "HEAD") else _method_not_allowed("GET")
            return NOT_FOUND
        except BadRequest as e:
            return error(400, str(e))
        except Exception as e:  # a bug must never become a traceback or a dropped call
            self.log.error("request_failed", path=path, error=repr(e))
            return error(500, "internal error")

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """One request whose credentials were checked, answered on the spot (its store
        calls made here, blocking)."""
        r = self.route(method, path, body)
        return r if isinstance(r, Response) else self.run(r, path)

    def run(self, job: Job, path: str = "") -> Response:
        """A job's answer; never raises."""
        try:
            return job.run()
        except Exception as e:  # a bug must never become a traceback or a dropped call
            self.log.error("request_failed", path=path, error=repr(e))
            return error(500, "internal error")

    def no_answer(self) -> str:
        """Why a store call is given up: it is later than the policy's store timeout."""
        return (f"TimeoutError: no answer from the store in "
                f"{self.engine.policy.store_timeout_ms} ms")

    # -- routes
    def admit(self, body: bytes) -> Job:
        """An admit decided by the blocking :meth:`Engine.admit` (a server with no
        pipeline of its own: :class:`policer.serve.admits.Admits` is the worker's)."""
        call = call_from_body(body)
        engine = self.engine
        t0 = time.perf_counter()
        return Job(lambda: decided(engine.admit(call)),
                   lambda: decided(engine.admit_failed(call, self.no_answer(), t0)))

    def explain(self, body: bytes) -> Job:
        call = call_from_body(body)

        def run() -> Response:
            try:
                return Response(200, dumps(self.engine.explain(call).as_dict()))
            except StoreError as e:
                return error(503, f"store error: {e}")

        return Job(run, lambda: error(503, f"store error: {self.no_answer()}"))

    def egress(self, body: bytes) -> Job:
        """``{"dialog_id", "gateway", ["sent", "timeout_ms"]}``: may the admitted call go
        to this gateway? ``{"taken": true|false, ...}`` (``policer egress --json``); a
        store that does not answer in time: the policy's ``on_store_error``."""
        data = object_of(body)
        did = dialog_id_from_body(data)
        gateway = text(data, "gateway", True) or ""
        if len(gateway) > MAX_VALUE:
            raise BadRequest(f"'gateway' is longer than {MAX_VALUE} characters")
        engine = self.engine
        deadline = client_deadline(data, engine)
        return Job(lambda: Response(200, dumps(engine.egress(did, gateway, deadline)
                                               .as_dict())),
                   lambda: Response(200, dumps(engine.egress_fallback(
                       did, self.no_answer()).as_dict())))

    def confirm(self, body: bytes) -> Response | Job:
        did = dialog_id_from_body(object_of(body))
        return self._event(did, Op("confirm", did, self.engine.policy.timeouts.dialog_ms))

    def refresh(self, body: bytes) -> Response | Job:
        data = object_of(body)
        did = dialog_id_from_body(data)
        timeout = data.get("timeout")
        if timeout is None:
            ms = self.engine.policy.timeouts.dialog_ms
        elif isinstance(timeout, int) and not isinstance(timeout, bool) and \
                0 < timeout <= 10 * 365 * 86400:
            ms = timeout * 1000
        else:
            raise BadRequest("'timeout' must be a positive number of seconds")
        return self._event(did, Op("refresh", did, ms))

    def release(self, body: bytes) -> Response | Job:
        data = object_of(body)
        did = dialog_id_from_body(data)
        reason = text(data, "reason") or "bye"
        if reason not in _END_REASONS:
            raise BadRequest(f"'reason' must be one of {', '.join(END_REASONS)}")
        return self._event(did, Op("release", did, reason), record=True)

    def _event(self, did: str, op: Op, record: bool = False) -> Response | Job:
        """Applied at once (200, ``ok``: the dialog was live) or queued in order while
        the store does not answer (202, ``queued``); an event the store has not
        answered within its timeout is answered as queued, and is applied or queued
        by the engine all the same. While the circuit is open it is queued here and
        now: the engine's tick and the admits probe the store, no event waits for a
        probe."""

        def answer(result: object) -> Response:
            out: dict[str, Any] = {"dialog_id": did, "ok": bool(result),
                                   "queued": result is None}
            if record:
                out["record"] = result.as_dict() if isinstance(result, CallRecord) else None
            return Response(202 if result is None else 200, dumps(out))

        engine = self.engine
        if engine.circuit_open:
            engine.queue_event(op)
            return answer(None)
        return Job(lambda: answer(engine.apply_event(op)), lambda: answer(None),
                   skip_late=False)

    def settle(self, body: bytes) -> Response | Job:
        """A call the client decided by its own fallback, the service not answering: an
        admit body, ``admitted``, and the ``sent`` / ``timeout_ms`` of the admit it gave
        up on. Admitted: recorded (once, counted from now); rejected: that admit never
        counts, whenever it reaches the store. Answered as a dialog event."""
        data = object_of(body)
        call = call_of(data)
        admitted = data.get("admitted")
        if not isinstance(admitted, bool):
            raise BadRequest("'admitted' must be true or false")
        engine = self.engine
        did = dialog_id(call.call_id, call.from_tag)
        if admitted:
            op = Op("record", did, engine.store.deadline_ms(0), call=call, node=engine.node)
        else:
            deadline = client_deadline(data, engine)
            if deadline is None:
                raise BadRequest("a rejected call's settlement needs the 'sent' (and "
                                 "'timeout_ms') of its admit")
            op = Op("void", did, deadline)
        return self._event(did, op)

    def sync(self, body: bytes) -> Response | Job:
        """The client's own dialogs, when the store lost its state (the Kamailio http
        flavour's timer asks once a second). ``{}``: answers ``{"resync": true}`` when
        this node must put its calls back; a JSON-RPC ``dlg.list`` reply (``result``:
        Kamailio's dialogs, the call's attributes kept in ``$dlg_var(policer_call)``):
        puts them back (:meth:`Engine.resync`) and answers what it did."""
        data = object_of(body)
        engine = self.engine
        if "result" not in data:
            return Response(200, dumps({"resync": engine.resync_due, "node": engine.node}))
        from policer.reconcile import parse_dialogs

        dialogs = parse_dialogs(data["result"])

        def run() -> Response:
            report = engine.resync(dialogs)
            if report is None:
                return error(503, "store error: the dialogs were not put back (sent again "
                                  "on the next ask)")
            return Response(200, dumps({"resync": False, **report.as_dict()}))

        return Job(run, lambda: error(503, f"store error: {self.no_answer()}"),
                   skip_late=False)

    def health(self) -> Job:
        return Job(self._health, lambda: self._unavailable(f"store error: {self.no_answer()}"))

    def _health(self) -> Response:
        engine = self.engine
        try:
            policy_hash = engine.store.loaded_hash()
        except StoreError as e:
            return self._unavailable(f"store error: {e}")
        except Exception as e:
            return self._unavailable(repr(e))
        return Response(200, dumps({"status": "ok", "node": engine.node,
                                    "namespace": engine.policy.namespace,
                                    "policy_hash": policy_hash,
                                    "pending": len(engine.pending),
                                    "circuit_open": engine.circuit_open}))

    def _unavailable(self, message: str) -> Response:
        return Response(503, dumps({"status": "unavailable", "node": self.engine.node,
                                    "error": message}))

    def metrics(self) -> Response | Job:
        """An operator's scrape: no deadline (each of its store reads is bounded by the
        store timeout, and a store that does not answer is reported as such)."""
        render = self._metrics
        if render is None:
            return NOT_FOUND
        return Job(lambda: Response(200, render(), METRICS), None)


def _method_not_allowed(allowed: str) -> Response:
    return error(405, f"method not allowed (use {allowed})")
