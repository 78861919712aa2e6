"""Redis Cluster: all keys of a namespace in one slot, namespaces spread over
the primaries, and the engine unchanged on a cluster URL."""

from __future__ import annotations

import itertools
import threading

from policer.call import Call
from policer.engine import Engine
from policer.policy import Policy
from policer.store import open_store
from policer.store.keys import Keys
from tests.support.cluster import Cluster
from tests.support.policies import build_policy, when


def cluster_policy(namespace: str) -> Policy:
    return build_policy(
        namespace, classes={"international": {"prefixes": ["00"]}, "local": {"default": True}},
        profiles={"total": {}, "international": when("international"), "user": "from_user"},
        limits={"total": 5, "user": 2})


def _slot_owner(cluster: Cluster) -> dict[int, int]:
    """slot -> port of the primary that serves it."""
    c = cluster.node_client(cluster.nodes[0].port)
    owner: dict[int, int] = {}
    for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
        for slot in range(int(start), int(end) + 1):
            owner[slot] = int(primary[1])
    c.close()
    return owner


def _keys_by_node(cluster: Cluster, ns: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in cluster.nodes:
        c = cluster.node_client(n.port)
        keys = sorted(c.scan_iter(match=Keys(ns).prefix.replace("{", "\\{")
                                  .replace("}", "\\}") + "*"))
        c.close()
        if keys:
            out[n.port] = keys
    return out


def _call(i: int, user: str, number: str) -> Call:
    return Call.from_raw(f"c{i}@cluster", "ft", from_user=user, from_domain="example.net",
                         ruri_user=number)


def test_all_keys_of_a_namespace_are_in_one_slot(redis_cluster: Cluster, namespace: str) -> None:
    store = open_store(redis_cluster.url, namespace, timeout_ms=5000)
    engine = Engine(cluster_policy(namespace), store, node="n1")
    ids = []
    for i, (user, number) in enumerate([("alice", "0049301"), ("bob", "5551"), ("bob", "5552"),
                                        ("bob", "5553"), ("carol", "5554")]):
        d = engine.admit(_call(i, user, number))
        assert not d.fallback, d.error
        ids.append((d.dialog_id, d.admitted))
    assert [a for _, a in ids] == [True, True, True, False, True]
    engine.confirm(ids[0][0])
    engine.set_var(ids[0][0], "billing", "x")
    store.limit_set("user", "carol", 7)
    assert engine.release(ids[1][0], "bye") is not None
    assert store.profile_size("total") == 3
    assert store.profile_values("user") == {"alice": 1, "bob": 1, "carol": 1}

    by_node = _keys_by_node(redis_cluster, namespace)
    assert len(by_node) == 1, by_node  # one primary holds the whole namespace
    (port, keys), = by_node.items()
    kinds = {k.split(":")[2] for k in keys}
    assert {"c", "d", "v", "n", "nidx", "stats", "decisions", "cdr"} <= kinds
    c = redis_cluster.node_client(port)
    slots = {c.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}
    c.close()
    assert len(slots) == 1, slots
    assert _slot_owner(redis_cluster)[int(slots.pop())] == port
    store.close()


def test_two_namespaces_can_live_on_different_primaries(redis_cluster: Cluster) -> None:
    owner = _slot_owner(redis_cluster)
    c = redis_cluster.node_client(redis_cluster.nodes[0].port)
    chosen: dict[int, str] = {}  # port -> namespace
    for i in itertools.count():
        ns = f"tenant{i}"
        port = owner[int(c.execute_command("CLUSTER", "KEYSLOT", Keys(ns).stats))]
        chosen.setdefault(port, ns)
        if len(chosen) == 2:
            break
    c.close()
    stores = {port: open_store(redis_cluster.url, ns, timeout_ms=5000)
              for port, ns in chosen.items()}
    for port, s in stores.items():
        engine = Engine(cluster_policy(s.namespace), s, node="n1")
        for i in range(3):
            d = engine.admit(_call(i, f"u{i}", "5551"))
            assert d.admitted and not d.fallback, d.error
        assert s.profile_size("total") == 3
        assert list(_keys_by_node(redis_cluster, s.namespace)) == [port]
        s.limit_set("user", "u0", 1)
        s.close()
    assert len(set(stores)) == 2


def test_a_reload_on_a_cluster_is_never_read_as_another_server(redis_cluster: Cluster,
                                                               namespace: str) -> None:
    """A node reads the store once a second; a reading that finds the library's mark
    unlike the epoch's makes it start a new epoch and hold admits for 3 s. A reload
    (a changed policy file) on a cluster loads every primary: no reading in between
    may see the new library before its epoch follows it."""
    loader = open_store(redis_cluster.url, namespace, timeout_ms=5000)
    reader = open_store(redis_cluster.url, namespace, timeout_ms=5000)
    loader.load(cluster_policy(namespace))
    seen: list[tuple[str, str]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            info = reader.info()
            if info.mark and info.mark != info.epoch_mark:
                seen.append((info.mark, info.epoch_mark))

    t = threading.Thread(target=read)
    t.start()
    try:
        for limit in range(6, 26):
            policy = build_policy(
                namespace, classes={"local": {"default": True}},
                profiles={"total": {}, "user": "from_user"},
                limits={"total": limit, "user": 2})
            loader.load(policy)
    finally:
        stop.set()
        t.join()
    assert seen == []
    loader.close()
    reader.close()
