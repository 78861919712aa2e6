"""A private ``redis-server`` that policer starts and stops itself.

Used by the demo, ``policer bench`` and the test fixtures when no Redis URL is
configured. It listens on a free loopback port, keeps no data on disk and is
stopped (and its directory removed) by :meth:`RedisServer.stop`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["RedisServer", "RedisServerError", "find_redis_server", "free_port", "free_udp_port"]


class RedisServerError(RuntimeError):
    """The private Redis could not be started."""


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary, or None when none is installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: Ports this process handed out (free_udp_port, free_media_ports): handed out once
#: only, so that a port picked for one SIPp and not bound yet is never another's (a
#: SIPp's media ports are four in a row: one of them was another UAS's SIP port).
_HANDED: set[int] = set()


def _udp_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.bind((host, port))
        except OSError:
            return False
    return True


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` free for UDP and for TCP right now (SIP listens on both), never
    handed out before by this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
        if port in _HANDED:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                t.bind((host, port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    raise RuntimeError("no free UDP port")


def free_media_ports(host: str = "127.0.0.1") -> int:
    """The first of four UDP ports in a row on ``host``, all free right now and never
    handed out before by this process: a SIPp's ``-mp`` (it binds audio RTP and RTCP,
    video RTP and RTCP there)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1]) & ~1
        span = range(port, port + 4)
        if port + 3 > 65535 or any(p in _HANDED for p in span) or \
                not all(_udp_free(host, p) for p in span):
            continue
        _HANDED.update(span)
        return port
    raise RuntimeError("no four free UDP ports in a row")


class RedisServer:
    """One private redis-server process on 127.0.0.1.

    >>> with RedisServer() as server:          # doctest: +SKIP
    ...     print(server.url)
    redis://127.0.0.1:40123/0
    """

    #: the server's log file, in its directory
    log_name = "redis.log"

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise RedisServerError(
                "redis-server is not installed (Debian: apt-get install redis-server)")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="policer-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        assert self.binary is not None
        return [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.dir / self.log_name),
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited at start: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.dir / self.log_name).read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        """Send a signal (SIGSTOP, SIGCONT, SIGKILL …) to the server, for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """Kill -9 the server without removing its directory (it can be restarted)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start again on the same port, empty."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
