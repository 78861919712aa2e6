"""One raw RESP connection for the tools that count what Redis spends per request
(``benchmarks.instructions``, ``benchmarks.module_floor``): requests packed in advance
and sent one at a time, as a proxy's worker sends them, with nothing of a client
library's own work between them."""

from __future__ import annotations

import socket
from typing import Any, cast

import hiredis


def pack(*args: Any) -> bytes:
    """One command in RESP."""
    return cast(bytes, hiredis.pack_command(args))


class Conn:
    """A connection to a Redis at ``port`` on loopback."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader()

    def send(self, packed: bytes) -> Any:
        """Send one packed request and wait for its reply."""
        self.sock.sendall(packed)
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            self.reader.feed(self.sock.recv(1 << 20))

    def cmd(self, *args: Any) -> Any:
        return self.send(pack(*args))

    def cpu_s(self) -> float:
        """Redis's CPU time so far (user + system, ``INFO cpu``), in seconds."""
        info = self.cmd("INFO", "cpu").decode()
        fields = dict(line.split(":", 1) for line in info.split("\r\n") if ":" in line)
        return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])

    def close(self) -> None:
        self.sock.close()
