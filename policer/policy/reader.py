"""Reading a policy's YAML node tree: the typed accessors every section of
:mod:`policer.policy.load` uses, each reporting a problem as ``FILE:LINE:COL:
key.path: message`` and carrying on, so that a file's every problem is reported at
once. :class:`Reader` also remembers every node it was handed by its key path, for
checks that run over the built tree (:func:`policer.policy.load.cross_checks`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policer.policy.bounds import MAX_ERRORS
from policer.policy.durations import DURATION, UNIT_MS, format_ms
from policer.policy.model import ATTRIBUTE_SOURCES, Reject

__all__ = ["NUMBER", "Reader", "did_you_mean", "kind_of", "shown"]

_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
#: a dialled number or prefix
NUMBER = re.compile(r"[0-9A-Za-z+*#]{1,32}")
#: numbers or prefixes, one per line
_NUMBERS = re.compile(r"(?:[0-9A-Za-z+*#]{1,32}\n)*[0-9A-Za-z+*#]{1,32}")
_NULL = "tag:yaml.org,2002:null"


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


#: what :meth:`Reader.scalar` returns for a scalar YAML cannot build
INVALID: Any = _Invalid()
#: the reason phrase a reject code gets when the policy gives none
_REASONS = {
    403: "Forbidden",
    480: "Temporarily Unavailable",
    486: "Busy Here",
    503: "Service Unavailable",
    600: "Busy Everywhere",
    603: "Decline",
}


def did_you_mean(word: str, known: Iterable[str], otherwise: str = "") -> str:
    """The hint after an unknown name: `` (did you mean 'x'?)`` with the closest of
    ``known``, else ``otherwise``."""
    near = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean '{near[0]}'?)" if near else otherwise


class Reader:
    """Typed access to YAML nodes, collecting errors with their positions.

    ``base``: the folder ``prefixes_file`` names are relative to (the policy file's).
    """

    def __init__(self, source: str, base: Path | None = None) -> None:
        self.source = source
        self.base = base if base is not None else Path(".")
        #: (file rank, line, column, text): the policy file ranks 0, list files after it
        self.errors: list[tuple[int, int, int, str]] = []
        #: errors past MAX_ERRORS, counted only
        self.more = 0
        self._constructor = yaml.SafeLoader("")
        #: every node handed out by a mapping (or list entry), by its key path
        self.nodes: dict[str, Node] = {}
        #: (profile, index among its valid entries) -> the key path it was read at
        self.entry_paths: dict[tuple[str, int], str] = {}
        #: the prefixes_file lists read (or tried), in order
        self.files: list[str] = []

    # -- reporting
    def error(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.error_at(self.source, mark.line + 1, mark.column + 1, path, message)

    def error_at(self, source: str, line: int, column: int, path: str, message: str) -> None:
        """An error at a place of the policy file or of one of its list files."""
        if len(self.errors) >= MAX_ERRORS:
            self.more += 1
            return
        if source == self.source:
            rank = 0
        elif source in self.files:
            rank = 1 + self.files.index(source)
        else:
            rank = len(self.files) + 1
        self.errors.append((rank, line, column, f"{source}:{line}:{column}: {path}: {message}"))

    def sorted_errors(self) -> list[str]:
        out = [e[3] for e in sorted(self.errors, key=lambda e: (e[0], e[1], e[2]))]
        if self.more:
            out.append(f"{self.source}:1:1: (file): {self.more} more errors not listed "
                       f"(the first {MAX_ERRORS} are)")
        return out

    # -- node helpers
    def mapping(self, node: Node, path: str, known: Iterable[str]) -> dict[str, Node] | None:
        """Children of a mapping node by key; reports duplicates and unknown keys."""
        if not isinstance(node, MappingNode):
            if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
                return {}
            self.error(node, path, f"expected a mapping, got {kind_of(node)}")
            return None
        known_list = list(known)
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, path, "keys must be plain names")
                continue
            key = str(key_node.value)
            sub = _join(path, key)
            if key in out:
                self.error(key_node, sub, "duplicate key")
                continue
            if known_list and key not in known_list:
                self.error(key_node, sub, f"unknown key{did_you_mean(key, known_list)}")
                continue
            out[key] = value_node
            self.nodes[sub] = value_node
        return out

    def free_mapping(self, node: Node, path: str) -> dict[str, Node] | None:
        return self.mapping(node, path, ())

    def scalar(self, node: Node) -> Any:
        """A scalar's value as YAML types it (``10`` an int, ``true`` a bool), or
        :data:`INVALID` when its tag has no value of it (``!!binary 1``, ``!!int x``,
        ``!!python/object:…``: the safe constructor refuses them), which every caller
        then reports as a value of the wrong type."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except Exception:  # the constructor's errors are of many kinds (ValueError too)
            return INVALID

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(node, path, f"expected an integer, got {kind_of(node)}")
            return None
        if not lo <= value <= hi:
            self.error(node, path, f"must be between {lo} and {hi}, got {value}")
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            self.error(node, path, f"expected true or false, got {kind_of(node)}")
            return None
        return value

    def string(self, node: Node, path: str, pattern: re.Pattern[str] | None = None,
               what: str = "") -> str | None:
        if not isinstance(node, ScalarNode) or node.tag.endswith(":null"):
            self.error(node, path, f"expected a string, got {kind_of(node)}")
            return None
        value = str(node.value)
        if pattern is not None and not pattern.match(value):
            self.error(node, path, f"{what or 'invalid value'}: {value!r}")
            return None
        return value

    def choice(self, node: Node, path: str, choices: tuple[str, ...]) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        if value not in choices:
            self.error(node, path, f"must be one of {', '.join(choices)}, got {value!r}"
                                   f"{did_you_mean(value, choices)}")
            return None
        return value

    def duration_ms(self, node: Node, path: str, lo_ms: int, hi_ms: int) -> int | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        ms: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            ms = value * 1000
        elif isinstance(value, str) and DURATION.match(value.strip()):
            ms = sum(int(n) * UNIT_MS[u] for n, u in _DURATION_PART.findall(value))
        if ms is None:
            self.error(node, path, f"expected a duration such as 30s, 5m, 12h or 250ms, "
                       f"got {kind_of(node)}")
            return None
        if not lo_ms <= ms <= hi_ms:
            self.error(node, path, f"must be between {format_ms(lo_ms)} and {format_ms(hi_ms)}, "
                       f"got {format_ms(ms)}")
            return None
        return ms

    def number_list(self, node: Node, path: str) -> list[str]:
        """Numbers or prefixes, read as written (``00`` stays ``00`` even unquoted).
        Linear in the list's length (a million prefixes is a real list): a list of
        plain numbers is checked whole by one regular expression and one set."""
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"expected a list of numbers, got {kind_of(node)}")
            return []
        items = node.value
        values = [i.value for i in items if i.__class__ is ScalarNode and i.tag != _NULL]
        if len(values) == len(items):
            lines = "\n".join(values)
            if ((not values or (_NUMBERS.fullmatch(lines) is not None
                                # no value with a line break of its own ("0\n9")
                                and lines.count("\n") == len(values) - 1))
                    and len(set(values)) == len(values)):
                return values
        out: list[str] = []
        seen: set[str] = set()
        number = NUMBER.fullmatch
        for i, item in enumerate(items):
            if not isinstance(item, ScalarNode) or item.tag.endswith(":null") or item.value == "":
                self.error(item, f"{path}[{i}]", f"expected a number, got {kind_of(item)}")
                continue
            s = str(item.value).strip()
            if number(s) is None:
                self.error(item, f"{path}[{i}]",
                           f"not a dialled number or prefix: {shown(s)}")
                continue
            if s in seen:
                self.error(item, f"{path}[{i}]", f"{s!r} is listed twice")
                continue
            seen.add(s)
            out.append(s)
        return out

    def reject(self, node: Node, path: str, default: Reject) -> Reject | None:
        m = self.mapping(node, path, ("code", "reason", "retry_after"))
        if m is None:
            return None
        code = default.code
        reason = default.reason
        retry_after = default.retry_after
        if "code" in m:
            code = self.integer(m["code"], f"{path}.code", 300, 699) or code
            if "reason" not in m:
                reason = _REASONS.get(code, reason)
            # another code is another answer: the default's Retry-After (meant for a 503
            # overload) is not carried over to, say, a 403 or a 486
            retry_after = None
        if "reason" in m:
            r = self.string(m["reason"], f"{path}.reason", re.compile(r"^[^\r\n\x00]{1,128}$"),
                            "a reason phrase is one line of 1 to 128 characters")
            reason = r if r is not None else reason
        if "retry_after" in m:
            if isinstance(m["retry_after"], ScalarNode) and m["retry_after"].tag.endswith(":null"):
                retry_after = None
            else:
                ra = self.integer(m["retry_after"], f"{path}.retry_after", 0, 86400)
                retry_after = ra if ra is not None else retry_after
        return Reject(code=code, reason=reason, retry_after=retry_after)

    # -- the document

    def unknown_ref(self, node: Node, path: str, what: str, name: str,
                    known: Iterable[str]) -> None:
        self.error(node, path, f"unknown {what} {name!r}{did_you_mean(name, sorted(known))}")

    def source_ref(self, node: Node, path: str) -> str | None:
        """An attribute source: a built-in one or ``header:<Name>``."""
        s = self.string(node, path)
        if s is None:
            return None
        if s.startswith("header:"):
            name = s[7:]
            if not _HEADER.match(name):
                self.error(node, path, f"not a SIP header name: {name!r}")
                return None
            return "header:" + name.lower()
        if s not in ATTRIBUTE_SOURCES:
            hint = did_you_mean(s, ATTRIBUTE_SOURCES)
            self.error(node, path, f"unknown attribute source {s!r}{hint}; use one of "
                       f"{', '.join(ATTRIBUTE_SOURCES)} or header:<Name>")
            return None
        return s



def shown(text: str, limit: int = 40) -> str:
    """A value quoted for a message, cut at ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _join(path: str, key: str) -> str:
    return key if path == "(document)" else f"{path}.{key}"


def kind_of(node: Node) -> str:
    """What a node is, for messages: ``a mapping``, ``a list``, ``str 'ten'``."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        tag = node.tag.rsplit(":", 1)[-1]
        if tag == "null":
            return "nothing"
        return f"{tag} {node.value!r}"
    return "something else"
