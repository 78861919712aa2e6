"""Policies built from keyword arguments, for the tests whose subject is not the YAML
(the tests of the policy language write theirs out).

:func:`policy_yaml` gives the text (for a file the command line or Kamailio reads),
:func:`build_policy` the parsed :class:`Policy`. Each section is a mapping as the YAML
has it, with two shorthands: a profile given as a string is valued by that attribute
(``{"user": "from_user"}``), a limit given as an int is its max (``{"total": 5}``).
The text is YAML's JSON flow style, one line per section.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policer.policy import Policy, PolicyError, load_policy, parse_policy

__all__ = ["ACCOUNT", "EMERGENCY_112", "INTERNATIONAL", "INTERNATIONAL_CLASSES",
           "build_policy", "policy_errors", "policy_yaml", "when"]

#: ``call.attributes`` of the tests' account profiles
ACCOUNT: Mapping[str, str] = {"account": "header:X-Account"}
#: an emergency class (112) beside a default class
EMERGENCY_112: Mapping[str, Mapping[str, Any]] = {"emergency": {"numbers": ["112"]},
                                                  "other": {"default": True}}
#: emergency (112), international (00) and a default class, local
INTERNATIONAL_CLASSES: Mapping[str, Mapping[str, Any]] = {
    "emergency": {"numbers": ["112"]}, "international": {"prefixes": ["00"]},
    "local": {"default": True}}
#: a limit's answer for calls abroad
INTERNATIONAL: Mapping[str, Any] = {"code": 403, "reason": "International Limit"}


def when(number_class: str) -> dict[str, Any]:
    """A profile counting the calls of one number class."""
    return {"when": {"class": number_class}}


def policy_yaml(namespace: str = "test", *, version: int = 1,
                number: str | None = None, attributes: Mapping[str, str] | None = None,
                classes: Mapping[str, Mapping[str, Any]] | None = None,
                profiles: Mapping[str, Mapping[str, Any] | str] | None = None,
                limits: Mapping[str, Mapping[str, Any] | int] | None = None,
                **sections: Any) -> str:
    """A policy's text: ``classes`` default one default class (``local``), ``profiles``
    default ``total``; ``number`` and ``attributes`` make its ``call`` section; any other
    keyword is a top-level section as it is (``timeouts``, ``on_store_error``,
    ``store_timeout``, ``nodes``, ``emergency``, ``reject``, ...)."""
    call: dict[str, Any] = {}
    if number is not None:
        call["number"] = number
    if attributes:
        call["attributes"] = dict(attributes)
    doc: dict[str, Any] = {"version": version, "namespace": namespace}
    if call:
        doc["call"] = call
    doc["classes"] = dict(classes) if classes is not None else {"local": {"default": True}}
    doc["profiles"] = {name: {"value": spec} if isinstance(spec, str) else dict(spec)
                       for name, spec in (profiles or {"total": {}}).items()}
    if limits:
        doc["limits"] = {name: {"max": spec} if isinstance(spec, int) else dict(spec)
                         for name, spec in limits.items()}
    doc.update(sections)
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in doc.items())


def build_policy(namespace: str = "test", **kw: Any) -> Policy:
    """:func:`policy_yaml`, parsed."""
    return parse_policy(policy_yaml(namespace, **kw), "<test>")


def policy_errors(path: Path, text: str) -> list[str]:
    """What ``load_policy`` reports for ``text`` written to ``path``: each error without
    the file name (``LINE:COL: key: message``); fails when the text loads."""
    path.write_text(text)
    try:
        load_policy(path)
    except PolicyError as e:
        prefix = f"{path}:"
        assert all(x.startswith(prefix) for x in e.errors), e.errors
        return [x[len(prefix):] for x in e.errors]
    raise AssertionError(f"{path} loaded")
