"""The store contract suite, unchanged, on a three-primary Redis Cluster.

``store`` here is the cluster store of ``tests/cluster/conftest.py``; every
test of ``tests/test_store_contract.py`` runs once against it.
"""

from __future__ import annotations

from tests.test_store_contract import *  # noqa: F403  (the contract tests themselves)


def test_the_store_here_is_a_cluster_store(store: object) -> None:
    from redis.cluster import RedisCluster

    from policer.store import RedisStore

    assert isinstance(store, RedisStore)
    assert isinstance(store.client, RedisCluster)
    assert len(store.client.get_primaries()) == 3


def test_every_contract_test_is_collected_here() -> None:
    from tests import test_store_contract

    names = {n for n in dir(test_store_contract) if n.startswith("test_")}
    assert names and names <= set(globals())
