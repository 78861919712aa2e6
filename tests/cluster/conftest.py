"""A three-primary Redis Cluster of private ``redis-server`` processes (one per
test session), and a ``store`` fixture over it that replaces the top-level
one for the tests of this directory: the contract suite runs unchanged on the
cluster (``test_contract_cluster.py``).

The cluster is made the way an operator makes one: three ``redis-server
--cluster-enabled yes`` processes on free loopback ports joined with
``redis-cli --cluster create … --cluster-replicas 0 --cluster-yes``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from policer.store import RedisStore
from tests.support import STORE_TIMEOUT_MS
from tests.support.cluster import Cluster, start_cluster
from tests.support.explicit import ExplicitRedisStore


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_url(redis_cluster: Cluster) -> str:
    """The cluster's URL, for tests that open a second store themselves."""
    return redis_cluster.url


@pytest.fixture
def store(redis_url: str, namespace: str) -> Iterator[RedisStore]:
    """A store on the cluster, empty (a namespace nobody else uses)."""
    s = ExplicitRedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    s.load(None)
    yield s
    s.close()
