"""Kamailio glue shared by both flavours of the Kamailio integration.

* native: ``deploy/kamailio/policer.cfg`` calls ``python_exec("admit")`` and
  ``python_exec("dialog_event", "dialog:end")`` …; app_python3 calls the methods of
  :class:`NativeHandler` (returned by ``mod_init()`` of the loaded script).
* KEMI: ``deploy/kamailio/policer_kemi.py`` routes in Python and calls
  :func:`admit_current`, :func:`reject_current` and :func:`dialog_event`.

Everything that touches Kamailio goes through the few ``_ksr_*`` functions below,
which import the ``KSR`` module (only present inside Kamailio) when first called,
so this module imports and type-checks anywhere.

The engine is built lazily, once per process id: the script is imported before
Kamailio forks its workers, and every worker (and the timer process that runs
dialog timeouts) must use its own Redis connections.

No function here raises: every entry point catches, logs with the Call-ID and
answers. Rejections and store errors are the engine's business (the policy's
``on_store_error``); a failure of the glue itself (no engine at all) answers 500.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from policer.call import Call, dialog_id

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
    "set_engine_factory",
]

#: The dialog module's event names, as event routes and ``event_callback`` see them.
DIALOG_EVENTS = ("dialog:start", "dialog:end", "dialog:failed")

#: Return values for app_python3: a cfg function returning 0 would stop the script.
OK = 1
FALSE = -1


# --------------------------------------------------------------------------- engine


class _Policy(Protocol):
    @property
    def header_names(self) -> tuple[str, ...]: ...


class _Decision(Protocol):
    @property
    def admitted(self) -> bool: ...
    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def retry_after(self) -> int | None: ...


class EngineLike(Protocol):
    """What this adapter needs of :class:`policer.engine.Engine`."""

    @property
    def policy(self) -> _Policy: ...

    def admit(self, call: Call) -> _Decision: ...

    def confirm(self, dialog_id: str) -> Any: ...

    def release(self, dialog_id: str, reason: str = ...) -> Any: ...


def _default_factory() -> EngineLike:
    """``Engine.from_env()``; ``POLICER_ENGINE_FACTORY=module:callable`` overrides (tests)."""
    spec = os.environ.get("POLICER_ENGINE_FACTORY", "")
    if spec:
        module_name, _, attr = spec.partition(":")
        factory: Callable[[], EngineLike] = getattr(importlib.import_module(module_name), attr)
        return factory()
    from policer.engine import Engine

    built: EngineLike = Engine.from_env()
    return built


_factory: Callable[[], EngineLike] = _default_factory
_engine: EngineLike | None = None
_engine_pid = 0


def set_engine_factory(factory: Callable[[], EngineLike]) -> None:
    """Use ``factory`` to build the engine (once per process); mainly for tests."""
    global _factory, _engine, _engine_pid
    _factory = factory
    _engine = None
    _engine_pid = 0


def engine() -> EngineLike:
    """This process's engine, built on first use after fork."""
    global _engine, _engine_pid
    pid = os.getpid()
    if _engine is None or _engine_pid != pid:
        _engine = _factory()
        _engine_pid = pid
    return _engine


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

    @classmethod
    def from_decision(cls, decision: _Decision, did: str) -> Verdict:
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
    call_id = _pv("$ci")
    did = dialog_id(call_id, _pv("$ft"))
    try:
        call = build_call()
        return Verdict.from_decision(engine().admit(call), call.dialog_id)
    except Exception:
        _log_exception("admit", call_id)
        return _error_verdict(did)


def reject_current(verdict: Verdict) -> None:
    """Answer the current request with a rejection (stateful when a transaction exists)."""
    ksr = _ksr()
    if verdict.retry_after is not None:
        ksr.hdr.append_to_reply(f"Retry-After: {verdict.retry_after}\r\n")
    ksr.sl.send_reply(verdict.code, verdict.reason)


def current_dialog_id() -> str:
    """The dialog id of the dialog in context (``$dlg``), else of the current message."""
    call_id = _pv("$dlg(callid)") or _pv("$ci")
    from_tag = _pv("$dlg(from_tag)") or _pv("$ft")
    return dialog_id(call_id, from_tag)


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
    call_id = _pv("$dlg(callid)") or _pv("$ci")
    try:
        did = current_dialog_id()
        if event == "dialog:start":
            engine().confirm(did)
        elif event in ("dialog:end", "dialog:failed"):
            engine().release(did, reason=_end_reason(event))
        else:
            log("dbg", f"policer: ignoring dialog event {event!r}")
    except Exception:
        _log_exception(event, call_id)
    return OK


def release_current(reason: str = "failed") -> int:
    """Release the dialog of the current request (admitted, then not relayed)."""
    call_id = _pv("$ci")
    try:
        engine().release(dialog_id(call_id, _pv("$ft")), reason=reason)
    except Exception:
        _log_exception("release", call_id)
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

    def admit(self, msg: object, args: str | None = None) -> int:
        verdict = admit_current()
        try:
            _set_var("policer_code", verdict.code)
            _set_var("policer_reason", verdict.reason)
            _set_var(
                "policer_retry_after", -1 if verdict.retry_after is None else verdict.retry_after
            )
        except Exception:
            _log_exception("admit (setting $var)", _pv("$ci"))
            return FALSE
        return OK if verdict.admitted else FALSE

    def dialog_event(self, msg: object, event: str = "") -> int:
        return dialog_event(event)

    def release(self, msg: object, reason: str = "failed") -> int:
        return release_current(reason or "failed")
