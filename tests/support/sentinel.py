"""A real Redis Sentinel for the tests: ``redis-server --sentinel`` on a free loopback
port, monitoring one primary."""

from __future__ import annotations

from lab.redis_server import RedisServer

#: The service name the sentinels know the primary by.
SENTINEL_SERVICE = "policer"
#: Sentinel timings: the primary is "down" after 1 s without an answer.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer(RedisServer):
    """One ``redis-server --sentinel`` process with its own config file."""

    log_name = "sentinel.log"

    def __init__(self, primary_port: int, quorum: int = 2,
                 service: str = SENTINEL_SERVICE) -> None:
        super().__init__()
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\n"
            f"bind 127.0.0.1\n"
            f"protected-mode no\n"
            f"daemonize no\n"
            f"dir {self.dir}\n"
            f"logfile {self.dir / self.log_name}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {service} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary, str(self.conf), "--sentinel"]
