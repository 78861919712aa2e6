"""What policer knows of one call: the :class:`Call` an adapter builds from a SIP
INVITE, and the ``<length>:<bytes>`` field format its attributes travel in.

Every value here comes from the network and is untrusted: any length, any
bytes. :func:`text` turns whatever an adapter has (``str``, ``bytes`` or
``None``) into a bounded ``str`` without raising. Turning such values into keys
(the dialog id, :func:`policer.store.keys.key_part`) is the store's business.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "KEPT_ATTRIBUTES_PREFIX",
    "MAX_VALUE",
    "Call",
    "pack_fields",
    "raw_bytes",
    "text",
    "unpack_fields",
    "unpack_values",
    "utf8_text",
]

#: Longest SIP value kept (characters); longer values are cut here.
MAX_VALUE = 4096

_EMPTY: Mapping[str, str] = MappingProxyType({})
#: How a call's attributes kept by the native Kamailio cfg start (``$dlg_var(policer_call)``):
#: ``policer-attrs;<source>,<source>...;<base64 of the packed attributes>``.
KEPT_ATTRIBUTES_PREFIX = "policer-attrs;"
_FIELDS = ("from_user", "from_domain", "ruri_user", "to_user", "source_ip", "auth_user",
           "gateway")


def text(value: object, limit: int = MAX_VALUE) -> str:
    """A bounded ``str`` from whatever a SIP stack hands over; never raises.

    Bytes that are not UTF-8 are kept as surrogate escapes (so two different
    byte strings stay different), ``None`` becomes ``""``.
    """
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        s = bytes(value[: limit * 4]).decode("utf-8", "surrogateescape")
    elif isinstance(value, str):
        s = value if value.isascii() else _wellformed(value[:limit])
    else:
        try:
            s = str(value)
        except Exception:
            return ""
    return s[:limit]


def raw_bytes(value: str) -> bytes:
    """The bytes of a str as the proxy saw them (surrogate escapes back to their
    bytes); never raises."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte string decodes to
        return value.encode("utf-8", "surrogatepass")


_utf8 = raw_bytes


def pack_fields(values: Iterable[str | bytes]) -> bytes:
    """Values as the decision function reads them (call attributes, queued dialog
    events): each ``<byte length>:<bytes>``, concatenated."""
    parts = []
    for v in values:
        b = v if isinstance(v, bytes) else v.encode() if v.isascii() else raw_bytes(v)
        parts.append(b"%d:%s" % (len(b), b))
    return b"".join(parts)


def unpack_fields(data: bytes, pos: int, n: int) -> tuple[list[bytes], int] | None:
    """``n`` fields packed by :func:`pack_fields` from ``pos`` and the position after
    them; None when malformed."""
    out: list[bytes] = []
    for _ in range(n):
        colon = data.find(b":", pos, pos + 10)
        if colon < 0 or not data[pos:colon].isdigit():
            return None
        end = colon + 1 + int(data[pos:colon])
        if end > len(data):
            return None
        out.append(data[colon + 1:end])
        pos = end
    return out, pos


def unpack_values(data: bytes, sources: Iterable[str]) -> dict[str, str]:
    """Attribute sources and their packed values, up to the first malformed field (as
    the decision function reads them)."""
    out: dict[str, str] = {}
    pos = 0
    for source in sources:
        got = unpack_fields(data, pos, 1)
        if got is None:
            break
        out[source] = got[0][0].decode("utf-8", "surrogateescape")
        pos = got[1]
    return out


def utf8_text(value: str) -> str:
    """A str as the stores keep text: valid UTF-8, undecodable bytes as U+FFFD."""
    return _utf8(value).decode("utf-8", "replace")


def _wellformed(value: str) -> str:
    """A str whose every character encodes (lone surrogates become surrogate escapes
    of their bytes), so that nothing downstream raises on it."""
    try:
        value.encode("utf-8", "surrogateescape")
        return value
    except UnicodeEncodeError:
        return raw_bytes(value).decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Call:
    """One initial INVITE as the policy sees it.

    ``headers`` maps lower-cased header names to their (first) value; an
    adapter only needs to fill the headers the policy names
    (:attr:`policer.policy.Policy.header_names`).
    """

    call_id: str
    from_tag: str = ""
    from_user: str = ""
    from_domain: str = ""
    ruri_user: str = ""
    to_user: str = ""
    source_ip: str = ""
    auth_user: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    #: where the call is sent (a gateway's host:port, Kamailio's ``$du``): usually
    #: unknown at admission and given per attempt (:meth:`policer.engine.Engine.egress`)
    gateway: str = ""

    @classmethod
    def from_raw(
        cls,
        call_id: object,
        from_tag: object = None,
        *,
        from_user: object = None,
        from_domain: object = None,
        ruri_user: object = None,
        to_user: object = None,
        source_ip: object = None,
        auth_user: object = None,
        headers: Mapping[str, object] | None = None,
        gateway: object = None,
    ) -> Call:
        """Build a Call from untrusted values (``str``, ``bytes`` or ``None``); never raises."""
        hdrs = {text(k, 256).lower(): text(v) for k, v in (headers or {}).items() if v is not None}
        return cls(
            call_id=text(call_id),
            from_tag=text(from_tag),
            from_user=text(from_user),
            from_domain=text(from_domain),
            ruri_user=text(ruri_user),
            to_user=text(to_user),
            source_ip=text(source_ip),
            auth_user=text(auth_user),
            headers=MappingProxyType(hdrs),
            gateway=text(gateway),
        )

    def to_json(self) -> str:
        """The call as compact JSON, for keeping with the proxy's own dialog (the
        adapter stores it in ``$dlg_var(policer_call)``) so that ``policer
        reconcile`` can count the call again after Redis lost it."""
        d = {k: v for k, v in (
            ("f", self.from_user), ("fd", self.from_domain), ("r", self.ruri_user),
            ("t", self.to_user), ("s", self.source_ip), ("a", self.auth_user),
            ("g", self.gateway)) if v}
        if self.headers:
            d["h"] = dict(self.headers)  # type: ignore[assignment]
        return json.dumps(d, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, call_id: object, from_tag: object, data: str) -> Call:
        """The call :meth:`to_json` kept, the attributes the native Kamailio cfg kept
        (:data:`KEPT_ATTRIBUTES_PREFIX`), or an admit body of ``policer serve`` (what the
        http flavour keeps); never raises (bad data gives a bare call)."""
        if isinstance(data, str) and data.startswith(KEPT_ATTRIBUTES_PREFIX):
            return cls.from_attributes(call_id, from_tag, _kept_attributes(data))
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                d = {}
        except (ValueError, TypeError):
            d = {}
        if "h" not in d and any(k in d for k in (*_FIELDS, "headers")):
            # the body of an admit of policer serve (the Kamailio http flavour keeps it)
            h = d.get("headers")
            return cls.from_raw(call_id, from_tag, headers=h if isinstance(h, dict) else None,
                                **{k: d.get(k) for k in _FIELDS})
        h = d.get("h")
        return cls.from_raw(call_id, from_tag, from_user=d.get("f"), from_domain=d.get("fd"),
                            ruri_user=d.get("r"), to_user=d.get("t"), source_ip=d.get("s"),
                            auth_user=d.get("a"), headers=h if isinstance(h, dict) else None,
                            gateway=d.get("g"))

    @classmethod
    def from_attributes(cls, call_id: object, from_tag: object,
                        values: Mapping[str, object]) -> Call:
        """A call from attribute sources and their values (``from_user`` …,
        ``header:<name>``); unknown sources are ignored. Never raises."""
        fields = {k: values.get(k) for k in _FIELDS}
        headers = {k[7:]: v for k, v in values.items() if k.startswith("header:")}
        return cls.from_raw(call_id, from_tag, headers=headers, **fields)

    def attribute(self, source: str) -> str:
        """The value of one attribute source: ``from_user`` … or ``header:<Name>``."""
        if source.startswith("header:"):
            return self.headers.get(source[7:].lower(), "")
        value = getattr(self, source, "")
        return value if isinstance(value, str) else ""


def _kept_attributes(data: str) -> dict[str, str]:
    """Sources and values from the native cfg's kept form; {} when malformed."""
    sources_text, sep, b64 = data[len(KEPT_ATTRIBUTES_PREFIX):].partition(";")
    if not sep:
        return {}
    try:
        packed = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return {}
    return unpack_values(packed, (s for s in sources_text.split(",") if s))
