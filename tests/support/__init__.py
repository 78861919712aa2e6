"""Helpers the tests share: stores, policies and calls to build, and polling.

Fixtures live in the ``conftest.py`` files and only there; everything a test
imports comes from this package (``tests.support``, ``tests.support.cli``,
``tests.support.e2e``, ``tests.support.cluster``), never from a conftest.
"""

from __future__ import annotations

import itertools
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lab.processes import wait_for as wait_for  # (re-exported: tests import it from here)
from policer.call import Call
from policer.engine import Engine
from policer.policy import Policy, load_policy, parse_policy
from policer.store import MemoryStore
from tests.support.explicit import ExplicitRedisStore

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
BAD_POLICIES = ROOT / "tests" / "policies"

#: Generous: the suite's Redis runs on a busy 2-core machine.
STORE_TIMEOUT_MS = 5000


def ticked(engine: Engine, condition: Callable[[], object]) -> Callable[[], object]:
    """A condition checked after one tick of ``engine``."""
    def check() -> object:
        engine.tick()
        return condition()
    return check


def new_namespace() -> str:
    return "t" + uuid.uuid4().hex[:16]


def make_store(kind: str, namespace: str, redis_url: str | None
               ) -> ExplicitRedisStore | MemoryStore:
    if kind == "redis":
        assert redis_url is not None
        s = ExplicitRedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
        s.load(None)  # a library for explicit memberships (no policy): the contract's calls
        return s
    return MemoryStore(namespace)


# ----------------------------------------------------------------------------- policies


def policy_text(text: str, namespace: str | None = None) -> Policy:
    """A policy from (indented) YAML text; ``namespace`` replaces the file's own."""
    text = textwrap.dedent(text)
    policy = parse_policy(text, "<test>")
    if namespace is not None:
        policy = with_namespace(policy, namespace)
    return policy


def policy_file(path: str | Path, namespace: str | None = None) -> Policy:
    policy = load_policy(path)
    if namespace is not None:
        policy = with_namespace(policy, namespace)
    return policy


def with_namespace(policy: Policy, namespace: str) -> Policy:
    return replace(policy, namespace=namespace)


EngineFactory = Callable[[Policy | str], Engine]


_call_ids = itertools.count(1)


def call(number: str, from_user: str = "alice", *, call_id: str | None = None,
         from_tag: str = "ft", headers: dict[str, str] | None = None, **kw: str) -> Call:
    """A call to ``number`` with a fresh Call-ID unless one is given."""
    return Call.from_raw(
        call_id or f"call-{next(_call_ids)}-{uuid.uuid4().hex[:8]}@test",
        from_tag,
        from_user=from_user,
        from_domain=kw.pop("from_domain", "example.net"),
        ruri_user=number,
        headers=headers,
        **kw,
    )
