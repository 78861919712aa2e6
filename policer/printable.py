"""How a value from SIP is shown: in metric labels, in JSON (``--json`` of the CLI,
the decision service's answers) and on a terminal (the CLI's tables, ``policer top``,
console logs). One form everywhere, :func:`printable`:

=======================================  ==========================  ===========
what the value holds                     shown as                    e.g.
=======================================  ==========================  ===========
a byte that is not UTF-8 (kept as a      ``\\xHH`` (HH >= 80)        ``\\xff``
surrogate escape, see policer.call)
a C0 control character or DEL            ``\\xHH`` (HH < 20, or 7f)  ``\\x1b``
a C1 control character (U+0080..009F)    ``\\u00HH``                 ``\\u009b``
a backslash                              ``\\\\``                    ``\\\\``
anything else                            itself                      ``ü``
=======================================  ==========================  ===========

The form is unambiguous (two values that differ print differently; a value that
holds the text ``\\xff`` prints ``\\\\xff``), readable, plain ASCII for every byte
that is not UTF-8 and every control character, and it is what bash reads inside
``$'...'``: ``policer profile size user $'m\\xffx'`` names the value shown as
``m\\xffx``. :func:`from_printable` turns it back into the value.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["from_printable", "printable", "printable_data"]

#: The characters :func:`printable` replaces: backslash, C0 controls, DEL, C1 controls
#: and surrogates (bytes that are not UTF-8, kept as surrogate escapes).
_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|(\\))")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    o = ord(c)
    if c == "\\":
        return "\\\\"
    if o < 0x80:  # C0 control or DEL
        return f"\\x{o:02x}"
    if o <= 0x9F:  # C1 control: \u, so that it never reads as the byte 0x80..0x9f
        return f"\\u{o:04x}"
    if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    # any other lone surrogate: its bytes, as policer.call.raw_bytes keys it
    return "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogatepass"))


def printable(value: str) -> str:
    """``value`` as policer shows it (the table above); a value with nothing to
    escape is returned as it is."""
    return _SPECIAL.sub(_escape, value)


def printable_data(obj: Any) -> Any:
    """A JSON-able structure with :func:`printable` applied to every string in it,
    keys of objects included; other values are kept (anything JSON has no type for
    becomes the printable form of its ``str``)."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable(k) if isinstance(k, str) else k: printable_data(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [printable_data(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float):
        return obj
    return printable(str(obj))


def _unescape(m: re.Match[str]) -> str:
    hex2, hex4, backslash = m.groups()
    if backslash:
        return "\\"
    if hex4:
        return chr(int(hex4, 16))
    o = int(hex2, 16)
    return chr(o) if o < 0x80 else chr(0xDC00 + o)  # a byte that is not UTF-8


def from_printable(text: str) -> str:
    """The value :func:`printable` showed as ``text`` (bytes that are not UTF-8 as
    surrogate escapes, as :func:`policer.call.text` keeps them). Raises ValueError
    on a backslash that starts no escape of that form."""
    if "\\" in _ESCAPE.sub("", text):
        raise ValueError(f"not a printable value: {text!r} (a backslash starts no escape)")
    return _ESCAPE.sub(_unescape, text)
