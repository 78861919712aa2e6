"""Kamailio glue shared by both flavours of the Kamailio integration.

* native: ``deploy/kamailio/policer.cfg`` calls ``python_exec("admit")`` and
  ``python_exec("dialog_event", "dialog:end")`` …; app_python3 calls the methods of
  :class:`NativeHandler` (returned by ``mod_init()`` of the loaded script).
* KEMI: ``deploy/kamailio/policer_kemi.py`` routes in Python and calls
  :func:`admit_current`, :func:`reject_current` and :func:`dialog_event`.

Everything that touches Kamailio goes through the few ``_ksr_*`` functions below,
which import the ``KSR`` module (only present inside Kamailio) when first called,
so this module imports and type-checks anywhere.

One engine per Kamailio instance: :func:`start` builds it in ``mod_init``, before
Kamailio forks its workers; the store opens Redis connections per process id, so
every worker (and the timer process that runs dialog timeouts) gets its own.
:func:`tick` runs about once a second in an rtimer process (lease, lost nodes,
queued operations, policy file changes).

No function here raises: every entry point catches, logs with the Call-ID and
answers. Rejections and store errors are the engine's business (the policy's
``on_store_error``); a failure of the glue itself (no engine at all) answers 500.
"""

from __future__ import annotations

import functools
import importlib
import os
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from policer.call import Call, dialog_id, split_dialog_id
from policer.engine import Decision, Engine

__all__ = [
    "DIALOG_EVENTS",
    "NativeHandler",
    "Verdict",
    "admit_current",
    "build_call",
    "current_dialog_id",
    "dialog_event",
    "engine",
    "log",
    "reject_current",
    "release_current",
    "release_unknown",
    "set_engine_factory",
    "start",
    "tick",
]

#: The dialog module's event names, as event routes and ``event_callback`` see them.
DIALOG_EVENTS = ("dialog:start", "dialog:end", "dialog:failed")

#: Return values for app_python3: a cfg function returning 0 would stop the script.
OK = 1
FALSE = -1


# --------------------------------------------------------------------------- engine


def _default_factory() -> Engine:
    return Engine.from_env()


_factory: Callable[[], Engine] = _default_factory
_engine: Engine | None = None


def set_engine_factory(factory: Callable[[], Engine] | None = None) -> None:
    """Build the engine with ``factory`` from now on (``None``: ``Engine.from_env()``);
    forgets the current one. For tests and embedders."""
    global _factory, _engine
    _factory = factory or _default_factory
    _engine = None


def engine() -> Engine:
    """This proxy's engine, built on first use.

    One engine serves the main process and every worker forked from it: the
    store opens its Redis connections per process id, so building it before
    Kamailio forks (in :func:`start`) is fine and saves each worker the policy load.
    """
    global _engine
    if _engine is None:
        _engine = _factory()
    return _engine


def start() -> int:
    """Once per Kamailio start, before the workers fork (``mod_init``): build the
    engine, end the dialogs this node (``POLICER_NODE``) left behind in an
    earlier run and take its lease. Never raises; a failure is logged and the
    engine is built again on first use."""
    global _engine
    try:
        engine().start()
    except Exception:
        _engine = None
        _log_exception("start", "")
    return OK


def tick() -> int:
    """About once a second from a timer process (rtimer): renew the lease, end
    dialogs of lost nodes, apply queued operations, reload a changed policy."""
    try:
        engine().tick()
    except Exception:
        _log_exception("tick", "")
    return OK


# --------------------------------------------------------------------------- KSR access

_ksr_module: Any = None


def _ksr() -> Any:
    global _ksr_module
    if _ksr_module is None:
        _ksr_module = importlib.import_module("KSR")
    return _ksr_module


def _pv(name: str) -> str:
    """A pseudo-variable's value as ``str``; ``""`` when it is null or unreadable."""
    try:
        value = _ksr().pv.get(name)
    except Exception:
        return ""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _header(name: str) -> str | None:
    """The first value of header ``name`` in the current message, or None."""
    ksr = _ksr()
    try:
        value = ksr.hdr.get(name)
    except AttributeError:  # older KEMI without KSR.hdr.get
        value = ksr.pv.get(f"$hdr({name})")
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _set_var(name: str, value: int | str) -> None:
    ksr = _ksr()
    if isinstance(value, int):
        ksr.pv.seti(f"$var({name})", value)
    else:
        ksr.pv.sets(f"$var({name})", value)


def log(level: str, message: str) -> None:
    """Log through Kamailio (``err``, ``warn``, ``notice``, ``info``, ``dbg``)."""
    try:
        getattr(_ksr(), level)(message.rstrip("\n") + "\n")
    except Exception:
        os.write(2, f"policer: {message}\n".encode(errors="replace"))


def _log_exception(where: str, call_id: str) -> None:
    lines = traceback.format_exc().strip().splitlines()
    detail = " | ".join(line.strip() for line in lines[-3:])
    log("err", f"policer: {where} failed for Call-ID {call_id!r}: {detail}")


def _sanitize_reason(reason: str) -> str:
    return "".join(ch for ch in reason if ch >= " " and ch != "\x7f")[:128] or "Rejected"


# --------------------------------------------------------------------------- decisions


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
            value = _header(name)
            if value is not None:
                headers[name] = value
    return Call.from_raw(
        _pv("$ci"),
        _pv("$ft"),
        from_user=_pv("$fU"),
        from_domain=_pv("$fd"),
        ruri_user=_pv("$rU"),
        to_user=_pv("$tU"),
        source_ip=_pv("$si"),
        auth_user=_pv("$au"),
        headers=headers,
    )


def admit_current() -> Verdict:
    """Ask the engine about the current initial INVITE; never raises."""
    try:
        call = build_call()
        decision = engine().admit(call)
        kept = call.to_json() if decision.admitted else ""
        return Verdict.from_decision(decision, decision.dialog_id, kept)
    except Exception:
        call_id = _pv("$ci")
        _log_exception("admit", call_id)
        return _error_verdict(_dialog_id(call_id, _pv("$ft")))


def reject_current(verdict: Verdict) -> None:
    """Answer the current request with a rejection (stateful when a transaction exists)."""
    ksr = _ksr()
    if verdict.retry_after is not None:
        ksr.hdr.append_to_reply(f"Retry-After: {verdict.retry_after}\r\n")
    ksr.sl.send_reply(verdict.code, verdict.reason)


@functools.lru_cache(maxsize=1024)
def _dialog_id(call_id: str, from_tag: str) -> str:
    # a dialog's events (start, end) arrive in the same worker more often than not
    return dialog_id(call_id, from_tag)


def current_dialog_id() -> str:
    """The dialog id of the dialog in context (``$dlg``), else of the current message."""
    call_id = _pv("$dlg(callid)") or _pv("$ci")
    from_tag = _pv("$dlg(from_tag)") or _pv("$ft")
    return _dialog_id(call_id, from_tag)


def _end_reason(event: str) -> str:
    method = _pv("$rm").upper()
    if event == "dialog:end":
        return "bye" if method == "BYE" else "timeout"
    # dialog:failed: a final reply >= 300 to the INVITE, or a CANCEL.
    if method == "CANCEL" or _pv("$rs") == "487":
        return "cancel"
    return "failed"


def dialog_event(event: str) -> int:
    """Tell the engine about a dialog module event; never raises."""
    did = ""
    try:
        did = current_dialog_id()
        if event == "dialog:start":
            engine().confirm(did)
        elif event in ("dialog:end", "dialog:failed"):
            engine().release(did, reason=_end_reason(event))
        else:
            log("dbg", f"policer: ignoring dialog event {event!r}")
    except Exception:
        _log_exception(event, split_dialog_id(did)[0])
    return OK


def release_current(reason: str = "failed") -> int:
    """Release the dialog of the current request (admitted, then not relayed)."""
    call_id = _pv("$ci")
    try:
        engine().release(_dialog_id(call_id, _pv("$ft")), reason=reason)
    except Exception:
        _log_exception("release", call_id)
    return OK


def release_unknown() -> int:
    """A BYE for a dialog this proxy does not track (another proxy set it up):
    release it. The caller's From-tag is the From-tag of a caller's BYE and the
    To-tag of a callee's; ``release`` is idempotent and a miss costs one lookup."""
    call_id = _pv("$ci")
    try:
        eng = engine()
        if eng.release(_dialog_id(call_id, _pv("$ft")), reason="bye") is None:
            to_tag = _pv("$tt")
            if to_tag:
                eng.release(_dialog_id(call_id, to_tag), reason="bye")
    except Exception:
        _log_exception("release (BYE of an unknown dialog)", call_id)
    return OK


# --------------------------------------------------------------------------- native flavour


class NativeHandler:
    """The object app_python3's ``mod_init()`` returns for ``python_exec``.

    ``python_exec("admit")`` sets ``$var(policer_code)`` (200 when admitted),
    ``$var(policer_reason)`` and ``$var(policer_retry_after)`` (-1 for none); the
    cfg (route ``POLICER``) replies or relays. Return values follow cfg truth:
    positive is true, negative false, never 0 (which would stop the script).
    """

    def child_init(self, rank: int) -> int:
        return 0

    def tick(self, msg: object, args: str | None = None) -> int:
        """``python_exec("tick")`` from the rtimer route, about once a second."""
        return tick()

    def admit(self, msg: object, args: str | None = None) -> int:
        verdict = admit_current()
        try:
            _set_var("policer_code", verdict.code)
            _set_var("policer_reason", verdict.reason)
            _set_var(
                "policer_retry_after", -1 if verdict.retry_after is None else verdict.retry_after
            )
            _set_var("policer_call", verdict.call_json)
        except Exception:
            _log_exception("admit (setting $var)", _pv("$ci"))
            return FALSE
        return OK if verdict.admitted else FALSE

    def dialog_event(self, msg: object, event: str = "") -> int:
        return dialog_event(event)

    def release(self, msg: object, reason: str = "failed") -> int:
        return release_current(reason or "failed")

    def release_unknown(self, msg: object, args: str | None = None) -> int:
        return release_unknown()
