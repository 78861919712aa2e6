"""Structured logs (structlog): JSON lines by default, a console renderer on a
TTY. ``POLICER_LOG_LEVEL`` (debug, info, warning, error; default info) and
``POLICER_LOG_FORMAT`` (json | console) choose; the CLI's ``--log-level`` and
``--log-format`` set the same.

Secrets never reach a log line: any value that looks like a URL with a
password has the password replaced by ``***``. Strings (values from SIP among them)
are logged in the printable form (:func:`policer.printable.printable`): no control
sequence reaches a terminal, and JSON lines hold no lone surrogate escape.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from policer.printable import printable, printable_data

__all__ = ["configure", "get_logger", "redact"]

_configured = False
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^@/\s:]*:)?[^@/\s]*@", re.I)
# a password in a URL's query: ?sentinel_password=secret, &password=secret
_QUERY_PASSWORD = re.compile(r"([?&][a-z0-9_]*password=)[^&#\s]*", re.I)
# a password in the repr of a connection (some redis-py versions): password=secret,
_REPR_PASSWORD = re.compile(r"(\b[a-z0-9_]*password=)(?!\*\*\*)[^,\s)>&#]*", re.I)


def redact(value: str) -> str:
    """A text without credentials, wherever it goes (log lines, error messages, the
    command line's output): ``redis://user:secret@host`` -> ``redis://user:***@host``
    (``redis://secret@host``, a password alone: ``redis://***@host``);
    ``?sentinel_password=secret`` -> ``?sentinel_password=***``; and ``password=secret``
    in the repr of a connection -> ``password=***``."""
    value = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}***@", value)
    value = _QUERY_PASSWORD.sub(r"\1***", value)
    return _REPR_PASSWORD.sub(r"\1***", value)


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]
                      ) -> MutableMapping[str, Any]:
    for k, v in event.items():
        if isinstance(v, str) and ("://" in v or "password=" in v.lower()):
            event[k] = redact(v)
    return event


def _printable_processor(_: Any, __: str, event: MutableMapping[str, Any]
                         ) -> MutableMapping[str, Any]:
    for k, v in event.items():
        if isinstance(v, str):
            event[k] = printable(v)
        elif isinstance(v, list | tuple | dict):
            event[k] = printable_data(v)
    return event


def configure(level: str | None = None, fmt: str | None = None,
              stream: TextIO | None = None) -> None:
    """Set the level and format for this process (idempotent, may be called again)."""
    global _configured
    level = (level or os.environ.get("POLICER_LOG_LEVEL") or "info").lower()
    out = stream or sys.stderr
    fmt = (fmt or os.environ.get("POLICER_LOG_FORMAT") or
           ("console" if out.isatty() else "json")).lower()
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_processor,
            _printable_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    """A structlog logger named ``name`` (configures logging on first use)."""
    if not _configured:
        configure()
    return structlog.get_logger(name).bind(logger=name)
