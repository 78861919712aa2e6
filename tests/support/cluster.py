"""A three-primary Redis Cluster of private ``redis-server`` processes, made the
way an operator makes one: three ``redis-server --cluster-enabled yes``
processes on free loopback ports joined with ``redis-cli --cluster create …
--cluster-replicas 0 --cluster-yes`` (``tests/cluster/conftest.py`` starts one
per test session)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest
import redis

from lab.redis_server import RedisServer, find_redis_server, free_port


@dataclass
class Cluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_cluster(primaries: int = 3, timeout: float = 30.0) -> Cluster:
    """Start ``primaries`` cluster-enabled servers and join them (no replicas)."""
    cli = shutil.which("redis-cli")
    if find_redis_server() is None or cli is None:
        pytest.fail("redis-server and redis-cli are needed (Debian: redis-server, redis-tools)")
    nodes: list[RedisServer] = []
    cluster = Cluster(nodes)
    try:
        for _ in range(primaries):
            # the cluster bus on its own free port (the default, port + 10000,
            # may be taken or out of range)
            n = RedisServer(extra_args=["--cluster-enabled", "yes",
                                        "--cluster-port", str(free_port()),
                                        "--cluster-config-file", "nodes.conf",
                                        "--cluster-node-timeout", "5000"])
            nodes.append(n)
            n.start()
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        for n in nodes:
            c = cluster.node_client(n.port)
            while True:
                info = c.execute_command("CLUSTER", "INFO")
                text = info if isinstance(info, str) else str(info)
                # every node must know all slots before the first test
                if "cluster_state:ok" in text and "cluster_slots_assigned:16384" in text:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ready on port {n.port}: {text}")
                time.sleep(0.05)
            c.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster
