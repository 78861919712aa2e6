"""Kamailio glue, KEMI flavour (``deploy/kamailio/policer_kemi.py``): routing in
Python. An INVITE is one engine round trip (:func:`admit_current`,
:func:`reject_current`, :func:`manage_current`: dialog tracking, with the call's max
duration); dialog events (:func:`dialog_event`, :func:`release_current`,
:func:`release_unknown`) are queued in Kamailio's ``mqueue`` and applied by
:func:`timer` (an rtimer callback every 100 ms, which also runs the engine's tick once
a second) in batches; a batch the store did not take is kept by that process and sent
again first.

The glue is split by job; this module re-exports what the deploy scripts and
embedders import from it:

* :mod:`policer.adapters.kamailio_ksr`: the ``KSR`` module, pseudo-variables,
  logging, ``dlg.list``;
* :mod:`policer.adapters.kamailio_engine`: the one engine per Kamailio instance,
  :func:`start` (``mod_init``, before the fork), :func:`tick`, :func:`probe`;
* :mod:`policer.adapters.kamailio_queue`: the ``mqueue`` of dialog events,
  :func:`flush`;
* :mod:`policer.adapters.kamailio_native`: the native flavour's timer process
  (:class:`NativeTimer`, :class:`NativeHandler`, :func:`start_native`, the fallback
  htables).

No function here raises: every entry point catches, logs with the Call-ID and
answers. Rejections and store errors are the engine's business (the policy's
``on_store_error``); a failure of the glue itself (no engine at all) answers 500.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from policer.adapters.kamailio_engine import (
    current,
    engine,
    probe,
    set_engine_factory,
    start,
    tick,
)
from policer.adapters.kamailio_ksr import (
    OK,
    header,
    ksr,
    log,
    log_exception,
    proxy_dialogs,
    pv,
)
from policer.adapters.kamailio_native import (
    NativeHandler,
    NativeTimer,
    emergency_entries,
    fallback_tables,
    start_native,
)
from policer.adapters.kamailio_queue import (
    BATCH_BYTES,
    BATCH_OPS,
    QUEUE,
    flush,
    hand_off,
    queue_op,
    waiting,
)
from policer.call import Call
from policer.compile import attribute_sources
from policer.decision import Decision, EgressAnswer
from policer.store import EgressResult, Op
from policer.store.keys import dialog_id, split_dialog_id

__all__ = [
    "BATCH_BYTES",
    "BATCH_OPS",
    "DIALOG_EVENTS",
    "DURATION_CAP_ROUTE",
    "OK",
    "QUEUE",
    "EgressResult",
    "NativeHandler",
    "NativeTimer",
    "Verdict",
    "admit_current",
    "build_call",
    "current_dialog_id",
    "dialog_event",
    "egress_current",
    "emergency_entries",
    "engine",
    "fallback_tables",
    "flush",
    "gateway_of",
    "log",
    "manage_current",
    "probe",
    "proxy_dialogs",
    "reject_current",
    "release_current",
    "release_unknown",
    "set_engine_factory",
    "start",
    "start_native",
    "tick",
    "timer",
]

#: The dialog module's event names, as event routes and ``event_callback`` see them.
DIALOG_EVENTS = ("dialog:start", "dialog:end", "dialog:failed")
#: The dialog module's timeout route of a call with a max duration
#: (``$dlg_ctx(timeout_route)``): a route of policer.cfg in the native flavour. In
#: KEMI the ``event_callback`` runs instead when the call reaches it, before the module
#: sends its BYEs, with the event ``dialog:timeout`` (Kamailio 5.6; its documentation
#: says with the route's name: both are taken). Either marks the end ``duration_cap``.
DURATION_CAP_ROUTE = "POLICER_DURATION_CAP"
DURATION_CAP_EVENTS = frozenset({"dialog:timeout", DURATION_CAP_ROUTE})
#: ``$dlg_var`` naming why the dialog module ended a call (set by the timeout route)
END_VAR = "$dlg_var(policer_end)"

#: How long a KEMI SIP worker's poll after a dialog event waits for a policy reload
#: running in the background (its tick-less process gives the reload that much time).
WORKER_RELOAD_WAIT_S = 0.05


# --------------------------------------------------------------------------- decisions


def _sanitize_reason(reason: str) -> str:
    return "".join(ch for ch in reason if ch >= " " and ch != "\x7f")[:128] or "Rejected"


@dataclass(frozen=True, slots=True)
class Verdict:
    """How to answer an initial INVITE: relay it (``admitted``) or reply ``code``."""

    admitted: bool
    code: int
    reason: str
    retry_after: int | None = None
    dialog_id: str = ""
    #: the admitted call's attributes, kept in ``$dlg_var(policer_call)`` so that
    #: ``policer reconcile`` can count the call again if Redis loses it
    call_json: str = ""
    #: seconds the admitted call may last once answered (None: no cap)
    max_duration: int | None = None
    #: the admitted call's first gateway (``$du`` when admitted) as the admit decided
    #: it: taken, relay; full, try the next (:func:`egress_current` each); None: not
    #: decided, ask :func:`egress_current` for ``$du``
    egress: EgressAnswer | None = None

    @classmethod
    def from_decision(cls, decision: Decision, did: str, call_json: str = "") -> Verdict:
        admitted = bool(decision.admitted)
        code = 200 if admitted else int(decision.code)
        if not admitted and not 300 <= code <= 699:
            code = 503
        retry = decision.retry_after
        return cls(
            admitted=admitted,
            code=code,
            reason=_sanitize_reason(str(decision.reason or "")) if not admitted else "OK",
            retry_after=int(retry) if retry is not None and not admitted else None,
            dialog_id=did,
            call_json=call_json if admitted else "",
            max_duration=(int(decision.max_duration)
                          if admitted and decision.max_duration is not None
                          and decision.max_duration > 0 else None),
            egress=decision.egress if admitted else None,
        )


#: The answer when the glue itself fails (no engine could be built at all).
def _error_verdict(did: str) -> Verdict:
    return Verdict(admitted=False, code=500, reason="Server Error", dialog_id=did)


def build_call(headers: Mapping[str, str] | None = None) -> Call:
    """A :class:`Call` from the current SIP request's pseudo-variables."""
    if headers is None:
        names = engine().policy.header_names
        headers = {}
        for name in names:
            value = header(name)
            if value is not None:
                headers[name] = value
    return Call.from_raw(
        pv("$ci"),
        pv("$ft"),
        from_user=pv("$fU"),
        from_domain=pv("$fd"),
        ruri_user=pv("$rU"),
        to_user=pv("$tU"),
        source_ip=pv("$si"),
        auth_user=pv("$au"),
        headers=headers,
        gateway=gateway_of(pv("$du")),
    )


def gateway_of(uri: str | None) -> str:
    """A gateway as policer names it: the ``host:port`` of a destination URI (``$du``,
    e.g. ``sip:10.0.0.1:5060;transport=udp`` -> ``10.0.0.1:5060``); '' none."""
    if not uri:
        return ""
    rest = uri.split(":", 1)[1] if uri[:4].lower() in ("sip:", "sips") else uri
    return rest.split(";", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]


def egress_current() -> EgressResult:
    """May the current admitted INVITE go to ``$du`` (the gateway a dispatcher chose)?
    One store call per attempt, none when the policy has no gateway profile. Taken:
    relay it; full: try the next gateway (``ds_next_dst``), and when none is left answer
    with the result's ``code`` and ``reason``. Never raises (the policy's
    ``on_store_error`` decides when the store does not answer)."""
    eng = engine()
    gw = gateway_of(pv("$du"))
    try:
        if "gateway" not in attribute_sources(eng.policy):
            return EgressResult(True, 200, "OK", None, None, 0, -1, "", (), False)
        return eng.egress(current_dialog_id(), gw)
    except Exception:
        log_exception("egress", pv("$ci"))
        return eng.egress_fallback(current_dialog_id(), "egress: internal error")


def admit_current() -> Verdict:
    """Ask the engine about the current initial INVITE (one store round trip); never
    raises."""
    try:
        call = build_call()
        eng = engine()
        decision = eng.admit(call)
        if decision.fallback and eng.queued:
            hand_off(eng)
        kept = call.to_json() if decision.admitted else ""
        return Verdict.from_decision(decision, decision.dialog_id, kept)
    except Exception:
        call_id = pv("$ci")
        log_exception("admit", call_id)
        return _error_verdict(_dialog_id(call_id, pv("$ft")))


def reject_current(verdict: Verdict) -> None:
    """Answer the current request with a rejection (stateful when a transaction exists)."""
    k = ksr()
    if verdict.retry_after is not None:
        k.hdr.append_to_reply(f"Retry-After: {verdict.retry_after}\r\n")
    k.sl.send_reply(verdict.code, verdict.reason)


def _dialog_timeout_s() -> int:
    """Kamailio's dialog timeout (``default_timeout``): ``POLICER_DIALOG_TIMEOUT`` as
    ``run`` passes it, else the policy's ``timeouts.dialog``."""
    try:
        return int(os.environ.get("POLICER_DIALOG_TIMEOUT") or 0) or (
            engine().policy.timeouts.dialog_s)
    except ValueError:
        return engine().policy.timeouts.dialog_s


def manage_current(verdict: Verdict) -> None:
    """Dialog tracking (``dlg_manage``) for the current, admitted initial INVITE.

    With a max duration within the dialog timeout, the dialog times out then, counted
    from the answer: the dialog module ends the call with a BYE to each side
    (``$dlg_ctx(timeout_bye)``), in-dialog requests do not push the timeout on
    (``timeout-noreset``), and its timeout route (:data:`DURATION_CAP_ROUTE`, which
    :func:`dialog_event` receives) marks the end so that it is released as
    ``duration_cap``. Without one the dialog times out as before, without BYEs."""
    k = ksr()
    md = verdict.max_duration
    capped = md is not None and 0 < md <= _dialog_timeout_s()
    if capped:
        k.pv.seti("$dlg_ctx(timeout_bye)", 1)
        k.pv.sets("$dlg_ctx(timeout_route)", DURATION_CAP_ROUTE)
    k.dialog.dlg_manage()
    if capped:
        k.dialog.dlg_set_timeout(md)
        k.dialog.dlg_set_property("timeout-noreset")


@functools.lru_cache(maxsize=1024)
def _dialog_id(call_id: str, from_tag: str) -> str:
    # cached per process: a worker encodes a dialog's id once for the events of that
    # dialog it handles (of its INVITE, 2xx, BYE, each reaches any worker)
    return dialog_id(call_id, from_tag)


def current_dialog_id() -> str:
    """The dialog id of the dialog in context (``$dlg``), else of the current message."""
    call_id = pv("$dlg(callid)") or pv("$ci")
    from_tag = pv("$dlg(from_tag)") or pv("$ft")
    return _dialog_id(call_id, from_tag)


def _end_reason(event: str) -> str:
    method = pv("$rm").upper()
    if event == "dialog:end":
        if pv(END_VAR) == "duration_cap":  # the call reached its max duration
            return "duration_cap"
        return "bye" if method == "BYE" else "timeout"
    # dialog:failed: a final reply >= 300 to the INVITE, or a CANCEL.
    if method == "CANCEL" or pv("$rs") == "487":
        return "cancel"
    return "failed"


# --------------------------------------------------------------------------- dialog events


def _confirm_op(did: str) -> bytes:
    # no timeout: the policy's dialog timeout (the function's DIALOG_MS)
    return engine().pack([Op("confirm", did)])


def _release_op(did: str, reason: str) -> bytes:
    return engine().pack([Op("release", did, reason)])


def dialog_event(event: str) -> int:
    """Queue a dialog module event (answered: confirm; ended or failed: release with
    its reason; ``dialog:timeout``: the timeout route of a call with a max duration,
    which reached it: its end is released as ``duration_cap``); never raises, never
    waits for Redis."""
    did = ""
    try:
        if event in DURATION_CAP_EVENTS:
            ksr().pv.sets(END_VAR, "duration_cap")
            return OK
        did = current_dialog_id()
        if event == "dialog:start":
            queue_op(_confirm_op(did), did)
        elif event in ("dialog:end", "dialog:failed"):
            queue_op(_release_op(did, _end_reason(event)), did)
        else:
            log("dbg", f"policer: ignoring dialog event {event!r}")
        # a SIP worker has no tick: it picks up a changed policy file here (a stat at
        # most once a second), after the event is queued and never inside a decision;
        # a big policy is read in the background, given 50 ms per event (Kamailio
        # holds Python's lock between calls: the reload runs while this one waits)
        engine().poll_policy(wait=WORKER_RELOAD_WAIT_S)
    except Exception:
        log_exception(event, split_dialog_id(did)[0])
    return OK


def release_current(reason: str = "failed") -> int:
    """Queue the release of the current request's dialog (admitted, then not relayed)."""
    call_id = pv("$ci")
    try:
        did = _dialog_id(call_id, pv("$ft"))
        queue_op(_release_op(did, reason), did)
    except Exception:
        log_exception("release", call_id)
    return OK


def release_unknown() -> int:
    """A BYE for a dialog this proxy does not track (another proxy set it up):
    queue its release. The caller's From-tag is the From-tag of a caller's BYE and
    the To-tag of a callee's: both are released (one names the call, the other no
    live dialog; a release is idempotent)."""
    call_id = pv("$ci")
    try:
        did = _dialog_id(call_id, pv("$ft"))
        queue_op(_release_op(did, "bye"), did)
        to_tag = pv("$tt")
        if to_tag:
            did = _dialog_id(call_id, to_tag)
            queue_op(_release_op(did, "bye"), did)
    except Exception:
        log_exception("release (BYE of an unknown dialog)", call_id)
    return OK


# --------------------------------------------------------------------------- the timer


_next_tick = 0.0


def timer() -> int:
    """The KEMI flavour's rtimer callback, every 100 ms: :func:`flush`, and the
    engine's :func:`tick` once a second."""
    global _next_tick
    flush()
    now = time.monotonic()
    if now >= _next_tick:
        _next_tick = now + 1.0
        tick()
        eng = current()
        if eng is not None:
            probe(eng)
        if eng is not None and eng.metrics is not None:
            eng.metrics.pending(waiting() + eng.queued, eng.dropped)
    return OK
