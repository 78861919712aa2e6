"""What a request's JSON body holds (the call of an admit, the dialog of an event, when
the client stops waiting) and the JSON of every answer."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from policer.call import Call
from policer.printable import printable_data
from policer.store.keys import MAX_DIALOG_ID, dialog_id, is_dialog_id

if TYPE_CHECKING:
    from policer.engine import Engine

__all__ = ["MAX_DIALOG_ID", "BadRequest", "admit_of", "call_from_body", "call_of",
           "client_deadline", "dialog_id_from_body", "dumps", "loads", "object_of", "text"]

_CALL_FIELDS = ("from_user", "from_domain", "ruri_user", "to_user", "source_ip", "auth_user",
                "gateway")


class BadRequest(Exception):
    """The request is malformed: 400 with this message."""


def dumps(obj: Any) -> bytes:
    """JSON of an answer, every string in the printable form (policer.printable), as
    ``policer admit --json`` prints it: a byte that is not UTF-8 (orjson refuses its
    surrogate escape) as ``\\xff``, a control character as ``\\x1b``, a backslash as
    ``\\\\``. An answer none of whose strings holds such a character (no backslash in
    orjson's text: it escapes C0 controls, quotes and backslashes; no DEL; no 0xC2,
    which starts every C1 control) is sent as orjson wrote it."""
    try:
        out = orjson.dumps(obj)
        if b"\\" not in out and b"\x7f" not in out and b"\xc2" not in out:
            return out
    except TypeError:
        pass
    shown = printable_data(obj)
    try:
        return orjson.dumps(shown)
    except TypeError:
        return json.dumps(shown).encode()


def loads(body: bytes) -> Any:
    """The request's JSON: UTF-8 JSON text (RFC 8259) and nothing else. orjson first;
    JSON text with a lone surrogate escape (``"\\ud800"``, valid JSON that orjson
    refuses) is read by the standard library, whose str keeps it (the engine's Call
    handles such strings), held to what orjson takes otherwise: no byte order mark,
    UTF-8 only (no UTF-16 or UTF-32 guessed from the bytes), no NaN or Infinity (nor a
    number too large for a double)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        first = e
    if body.startswith(b"\xef\xbb\xbf"):
        raise BadRequest("malformed JSON: a UTF-8 byte order mark is not JSON") from None
    try:
        text_ = body.decode("utf-8", "surrogatepass")
        return json.loads(text_, parse_constant=_not_a_number, parse_float=_finite)
    except BadRequest:
        raise
    except (ValueError, RecursionError):
        raise BadRequest(f"malformed JSON: {first}") from None


def _not_a_number(name: str) -> Any:
    raise BadRequest(f"malformed JSON: {name} is not JSON")


def _finite(value_text: str) -> float:
    value = float(value_text)
    if not math.isfinite(value):
        raise BadRequest(f"malformed JSON: {value_text[:40]} is too large for a number")
    return value


def object_of(body: bytes) -> dict[str, Any]:
    """The body's JSON object; raises BadRequest."""
    data = loads(body)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def text(body: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    """A string member of a body (None when absent or null); raises BadRequest."""
    v = body.get(name)
    if v is None:
        if required:
            raise BadRequest(f"{name!r} is required")
        return None
    if not isinstance(v, str):
        raise BadRequest(f"{name!r} must be a string")
    return v


def _call_id(body: Mapping[str, Any]) -> str:
    """The request's ``call_id``: a non-empty string (a SIP Call-ID is never empty)."""
    call_id = text(body, "call_id", True)
    if not call_id:
        raise BadRequest("'call_id' must not be empty")
    return call_id


def call_from_body(body: bytes) -> Call:
    """The :class:`Call` of an admit (or explain) body; raises BadRequest."""
    return call_of(object_of(body))


def call_of(data: Mapping[str, Any]) -> Call:
    """The :class:`Call` of an admit body's object; raises BadRequest."""
    call_id = _call_id(data)
    from_tag = text(data, "from_tag", True)
    fields = {name: text(data, name) for name in _CALL_FIELDS}
    headers = data.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise BadRequest("'headers' must be an object of strings")
        for k, v in headers.items():
            if v is not None and not isinstance(v, str):
                raise BadRequest(f"headers[{k!r}] must be a string")
    return Call.from_raw(call_id, from_tag, headers=headers, **fields)


def admit_of(body: bytes, engine: Engine) -> tuple[Call, int | None]:
    """An admit body's call and when its client stops waiting (:func:`client_deadline`);
    raises BadRequest."""
    data = object_of(body)
    return call_of(data), client_deadline(data, engine)


def client_deadline(body: bytes | Mapping[str, Any], engine: Engine) -> int | None:
    """When an admit's client stops waiting, in the store's clock: its ``sent`` (its
    clock when it sent the request, Unix seconds) plus ``timeout_ms``, read with this
    host's clock skew to the store (the client's clock is taken for this host's: the
    Kamailio http flavour runs beside the service); None when it does not say.
    Raises BadRequest."""
    data = object_of(body) if isinstance(body, bytes) else body
    sent, timeout = data.get("sent"), data.get("timeout_ms", 1000)
    if sent is None:
        return None
    try:
        s = float(sent)
    except (TypeError, ValueError):
        raise BadRequest("'sent' must be Unix seconds") from None
    if not (isinstance(timeout, int) and not isinstance(timeout, bool)
            and 0 < timeout <= 3_600_000) or not 0 < s < 1e11:
        raise BadRequest("'sent' must be Unix seconds and 'timeout_ms' a positive number "
                         "of ms")
    # the store's deadline of a request sent now, moved back by the time since ``sent``
    return engine.store.deadline_ms(timeout + round((s - time.time()) * 1000))


def dialog_id_from_body(data: Mapping[str, Any]) -> str:
    """The dialog id of an event body, as admit handed it out, or made from the raw
    ``call_id`` and ``from_tag`` (a proxy that did not keep the id, e.g. for a BYE of
    a dialog another proxy set up); raises BadRequest. Ids policer did not make
    (braces, separators, white space) are refused, so no client can name another key."""
    if "dialog_id" not in data and "call_id" in data:
        return dialog_id(_call_id(data), text(data, "from_tag", True))
    did = text(data, "dialog_id", True)
    assert did is not None
    if not is_dialog_id(did):
        raise BadRequest("'dialog_id' is not a dialog id policer gave")
    return did
