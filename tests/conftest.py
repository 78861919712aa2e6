"""Shared fixtures (only fixtures: the helpers tests import are in
``tests/support``): one private redis-server per test session, and stores of
both kinds with a fresh namespace per test, and engines built from policy text.

Tests talk to a real ``redis-server`` (started by
:class:`lab.redis_server.RedisServer` on a free loopback port), never a fake
Redis. The one stand-in is Kamailio's ``KSR`` module in
``tests/e2e/test_adapter.py`` (``FakeKSR``), which checks the KEMI adapter without
a Kamailio process; the e2e suite runs the same adapter inside real Kamailio.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.redis_server import RedisServer, find_redis_server
from policer import log
from policer.engine import Engine
from policer.policy import Policy
from policer.store import MemoryStore, RedisStore, Store
from tests.support import (
    STORE_TIMEOUT_MS,
    EngineFactory,
    make_store,
    new_namespace,
    policy_text,
    with_namespace,
)
from tests.support.cli import policy_copy
from tests.support.serve import Serve

# Rejections are logged at info: thousands of them would only slow the suite.
os.environ.setdefault("POLICER_LOG_LEVEL", "warning")
log.configure(level=os.environ["POLICER_LOG_LEVEL"])


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


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, namespace: str) -> Iterator[RedisStore | MemoryStore]:
    """Each store kind in turn, empty (a namespace nobody else uses)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    s = make_store(request.param, namespace, url)
    yield s
    s.close()


@pytest.fixture
def redis_store(redis_url: str, namespace: str) -> Iterator[RedisStore]:
    from tests.support.explicit import ExplicitRedisStore

    s = ExplicitRedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    s.load(None)
    yield s
    s.close()


@pytest.fixture
def engine_for(store: Store) -> EngineFactory:
    """Build an engine over this test's store from a Policy or from policy YAML text."""

    def make(policy: Policy | str) -> Engine:
        if isinstance(policy, str):
            policy = policy_text(policy)
        policy = with_namespace(policy, store.namespace)
        engine = Engine(policy, store, node="test-node")
        store.load(policy)  # this test's policy is the one the store decides by
        return engine

    return make


@pytest.fixture
def env(tmp_path: Path, redis_url: str, namespace: str) -> dict[str, str]:
    """The command line's and policer serve's environment: this test's Redis and a copy
    of policies/example.yaml in a namespace of its own (a module may override it)."""
    return {"POLICER_REDIS_URL": redis_url,
            "POLICER_POLICY": str(policy_copy(tmp_path, namespace))}


@pytest.fixture
def serve(tmp_path: Path, env: dict[str, str]) -> Iterator[Serve]:
    """A policer serve over ``env``, stopped after the test."""
    s = Serve(tmp_path, env)
    try:
        yield s
    finally:
        s.stop()
