"""Kamailio's ``KSR`` module, the one way the Kamailio glue touches Kamailio: the
module itself (:func:`ksr`, imported when first called: it only exists inside
Kamailio, so the glue imports and type-checks anywhere), pseudo-variables and headers
of the current message, logging through Kamailio, and this Kamailio's live dialogs
(``dlg.list``).
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
from typing import Any

from policer.reconcile import ProxyDialog, parse_dialogs

__all__ = ["OK", "header", "ksr", "log", "log_exception", "proxy_dialogs", "pv"]

#: The return value for app_python3: a cfg function returning 0 would stop the script.
OK = 1

_module: Any = None


def ksr() -> Any:
    """The ``KSR`` module (imported on first use)."""
    global _module
    if _module is None:
        _module = importlib.import_module("KSR")
    return _module


def pv(name: str) -> str:
    """A pseudo-variable's value as ``str``; ``""`` when it is null or unreadable."""
    try:
        value = ksr().pv.get(name)
    except Exception:
        return ""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def header(name: str) -> str | None:
    """The first value of header ``name`` in the current message, or None."""
    k = ksr()
    try:
        value = k.hdr.get(name)
    except AttributeError:  # older KEMI without KSR.hdr.get
        value = k.pv.get(f"$hdr({name})")
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def log(level: str, message: str) -> None:
    """Log through Kamailio (``err``, ``warn``, ``notice``, ``info``, ``dbg``)."""
    try:
        getattr(ksr(), level)(message.rstrip("\n") + "\n")
    except Exception:
        os.write(2, f"policer: {message}\n".encode(errors="replace"))


def log_exception(where: str, call_id: str) -> None:
    """Log the exception being handled, with the Call-ID it met (``err``)."""
    lines = traceback.format_exc().strip().splitlines()
    detail = " | ".join(line.strip() for line in lines[-3:])
    log("err", f"policer: {where} failed for Call-ID {call_id!r}: {detail}")


def proxy_dialogs() -> list[ProxyDialog]:
    """This Kamailio's live dialogs (``dlg.list`` through jsonrpcs, in this process):
    what :meth:`policer.engine.Engine.resync` puts back when Redis lost its state.
    Raises RuntimeError when the list cannot be read (the engine tries again next
    tick)."""
    k = ksr()
    if k.jsonrpcs.exec('{"jsonrpc":"2.0","method":"dlg.list","id":1}') < 0:
        raise RuntimeError("jsonrpcs could not run dlg.list")
    body = k.pv.get("$jsonrpl(body)")
    try:
        reply = json.loads(body if isinstance(body, str) else "")
    except ValueError as e:
        raise RuntimeError(f"dlg.list: not a JSON-RPC reply ({e})") from None
    if not isinstance(reply, dict) or "result" not in reply:
        raise RuntimeError(f"dlg.list failed: {str(reply)[:200]}")
    return parse_dialogs(reply["result"])
