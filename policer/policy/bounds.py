"""The bounds of what a policy may be (docs/security.md, "Policies: size, depth and
big prefix lists"): every one is checked before the work it bounds, and each is
reported like any other policy error (``FILE:LINE:COL: key.path: message``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_CLASS_ENTRIES",
    "MAX_DEPTH",
    "MAX_ERRORS",
    "POLICY_MAX_BYTES",
    "POLICY_MAX_BYTES_ENV",
    "PREFIXES_FILE_MAX_BYTES",
    "PREFIXES_FILE_MAX_BYTES_ENV",
    "TextError",
    "max_bytes",
    "read_text",
    "too_big",
]

#: A policy file's size (bytes), unless ``POLICER_POLICY_MAX_BYTES`` says otherwise:
#: a million inline prefixes is about 16 MB of YAML.
POLICY_MAX_BYTES = 16 * 1024 * 1024
POLICY_MAX_BYTES_ENV = "POLICER_POLICY_MAX_BYTES"
#: A ``prefixes_file``'s size (bytes), unless ``POLICER_PREFIXES_MAX_BYTES`` says
#: otherwise: a million prefixes of up to 32 characters with a comment each fit.
PREFIXES_FILE_MAX_BYTES = 64 * 1024 * 1024
PREFIXES_FILE_MAX_BYTES_ENV = "POLICER_PREFIXES_MAX_BYTES"
#: Collections nested in one another (a policy needs six levels at most).
MAX_DEPTH = 100
#: Nodes that aliases (``*name``) may repeat in all: an alias reads what it names
#: again, so a few of them could make a small file mean an exponential one.
MAX_ALIAS_NODES = 100_000
#: Dialled numbers and prefixes in all classes together: the library holds them as
#: Lua constants, and Redis 7.0 runs a library's top level (which builds their
#: tables) under a 500 ms limit when it loads it (docs/benchmarks.md).
MAX_CLASS_ENTRIES = 1_500_000
#: Errors listed for one file; the rest are counted in a last line.
MAX_ERRORS = 100


def max_bytes(env: str, default: int) -> int:
    """A size bound from the environment variable ``env`` (a number of bytes, at least
    1), else ``default``. Raises ValueError naming the variable when it is not one."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{env} is not a number of bytes: {raw!r}") from None
    if value < 1:
        raise ValueError(f"{env} must be at least 1, got {value}")
    return value


class TextError(Exception):
    """A file could not be read as text within its bound, at ``line``:``column``."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message


def read_text(path: Path, env: str, default_max: int, what: str) -> str:
    """A file's text; :class:`TextError` when it cannot be read, is larger than its
    bound (``env``, else ``default_max`` bytes: checked before reading, and a file
    that grows meanwhile is still cut there) or is not UTF-8. ``what`` names the
    kind of file in the messages ("a policy file")."""
    try:
        limit = max_bytes(env, default_max)
    except ValueError as e:
        raise TextError(1, 1, str(e)) from None
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                raise TextError(1, 1, too_big(st.st_size, limit, env, what))
            raw = f.read(limit + 1)
    except OSError as e:
        raise TextError(1, 1, f"cannot read: {e.strerror or e}") from None
    if len(raw) > limit:
        raise TextError(1, 1, too_big(len(raw), limit, env, what))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise TextError(line, col, f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def too_big(size: int, limit: int, env: str, what: str) -> str:
    """The message of a file (or text) over its size bound."""
    return f"{size} bytes, more than the {limit} {what} may have (set {env} to allow more)"
