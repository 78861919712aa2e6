"""Shared fixtures: one private redis-server per test session, stores of both
kinds with a fresh namespace per test, and helpers that build engines from
policy text.

Tests talk to a real ``redis-server`` (started by
:class:`lab.redis_server.RedisServer` on a free loopback port), never a fake
Redis. The one stand-in is Kamailio's ``KSR`` module in
``tests/e2e/test_adapter.py`` (``FakeKSR``), which checks the KEMI adapter without
a Kamailio process; the e2e suite runs the same adapter inside real Kamailio.
"""

from __future__ import annotations

import itertools
import os
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.redis_server import RedisServer, find_redis_server
from policer import log
from policer.call import Call
from policer.engine import Engine
from policer.policy import Policy, load_policy, parse_policy
from policer.store import MemoryStore, RedisStore, Store

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
BAD_POLICIES = Path(__file__).resolve().parent / "policies"

# Rejections are logged at info: thousands of them would only slow the suite.
os.environ.setdefault("POLICER_LOG_LEVEL", "warning")
log.configure(level=os.environ["POLICER_LOG_LEVEL"])

#: Generous: the suite's Redis runs on a busy 2-core machine.
STORE_TIMEOUT_MS = 5000


def new_namespace() -> str:
    return "t" + uuid.uuid4().hex[:16]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if find_redis_server() is None:
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    return new_namespace()


def make_store(kind: str, namespace: str, redis_url: str | None) -> RedisStore | MemoryStore:
    if kind == "redis":
        assert redis_url is not None
        s = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
        s.load(None)  # a library for explicit memberships (no policy): the contract's calls
        return s
    return MemoryStore(namespace)


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, namespace: str) -> Iterator[RedisStore | MemoryStore]:
    """Each store kind in turn, empty (a namespace nobody else uses)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    s = make_store(request.param, namespace, url)
    yield s
    s.close()


@pytest.fixture
def redis_store(redis_url: str, namespace: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    s.load(None)
    yield s
    s.close()


# ----------------------------------------------------------------------------- policies


def policy_text(text: str, namespace: str | None = None) -> Policy:
    """A policy from (indented) YAML text; ``namespace`` replaces the file's own."""
    text = textwrap.dedent(text)
    policy = parse_policy(text, "<test>")
    if namespace is not None:
        policy = _with_namespace(policy, namespace)
    return policy


def policy_file(path: str | Path, namespace: str | None = None) -> Policy:
    policy = load_policy(path)
    if namespace is not None:
        policy = _with_namespace(policy, namespace)
    return policy


def _with_namespace(policy: Policy, namespace: str) -> Policy:
    from dataclasses import replace

    return replace(policy, namespace=namespace)


EngineFactory = Callable[[Policy | str], Engine]


@pytest.fixture
def engine_for(store: Store) -> EngineFactory:
    """Build an engine over this test's store from a Policy or from policy YAML text."""

    def make(policy: Policy | str) -> Engine:
        if isinstance(policy, str):
            policy = policy_text(policy)
        policy = _with_namespace(policy, store.namespace)
        engine = Engine(policy, store, node="test-node")
        store.load(policy)  # this test's policy is the one the store decides by
        return engine

    return make


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
