"""Policies: YAML files validated into immutable objects.

:func:`load_policy` reads a file, :func:`parse_policy` a string. Every problem
of a file is reported at once, each as ``FILE:LINE:COL: key.path: message``
(:class:`PolicyError` carries them). A valid policy becomes a frozen
:class:`Policy` tree that the classifier and the engine read and nothing
changes. The language is described in ``docs/policy.md``.

The package: :mod:`~policer.policy.model` (the tree and its defaults),
:mod:`~policer.policy.reader` (typed access to YAML nodes, errors with positions),
:mod:`~policer.policy.sections` (one function per section of a file),
:mod:`~policer.policy.load` (parsing, building, checks across sections),
:mod:`~policer.policy.durations`.
"""

from policer.policy.durations import parse_duration_ms
from policer.policy.load import load_policy, parse_policy
from policer.policy.model import (
    ATTRIBUTE_SOURCES,
    DAYS,
    WINDOWS,
    Direction,
    Limit,
    Nodes,
    NumberClass,
    Policy,
    PolicyError,
    Profile,
    Rate,
    Reject,
    Schedule,
    Timeouts,
    Window,
)

__all__ = [
    "ATTRIBUTE_SOURCES",
    "DAYS",
    "WINDOWS",
    "Direction",
    "Limit",
    "Nodes",
    "NumberClass",
    "Policy",
    "PolicyError",
    "Profile",
    "Rate",
    "Reject",
    "Schedule",
    "Timeouts",
    "Window",
    "load_policy",
    "parse_duration_ms",
    "parse_policy",
]
