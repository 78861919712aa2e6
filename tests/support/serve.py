"""A real ``policer serve`` process for the tests (its own process group, a free
loopback port), an admit body, and raw-socket answer reading."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab.processes import stop_group
from lab.redis_server import free_port
from tests.support.cli import ROOT


class Serve:
    """One ``policer serve`` process (its own process group)."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str,
                 host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.host = host
        self.log = tmp_path / f"serve-{self.port}.log"
        full = {**os.environ, "POLICER_LOG_FORMAT": "json", "POLICER_LOG_LEVEL": "info",
                "POLICER_NODE": f"serve-test-{self.port}", **env}
        full.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "policer", "serve", "--listen",
                 f"{host}:{self.port}", *args],
                env=full, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"policer serve exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"policer serve did not listen:\n{self.log.read_text()}")
            time.sleep(0.05)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
        c = conn or self.connection()
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        c.request(method, path, body=data, headers=headers or {})
        r = c.getresponse()
        raw = r.read()
        if conn is None:
            c.close()
        ctype = r.getheader("Content-Type") or ""
        return r.status, json.loads(raw) if ctype.startswith("application/json") else raw

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **kw)

    def stop(self) -> None:
        stop_group(self.proc)


def body(call_id: str, from_user: str = "alice", number: str = "0301234567",
         **extra: Any) -> dict[str, Any]:
    return {"call_id": call_id, "from_tag": "ft", "from_user": from_user,
            "from_domain": "example.net", "ruri_user": number, "to_user": number,
            "source_ip": "192.0.2.7", "auth_user": "", **extra}


def read_answers(s: socket.socket, n: int) -> list[tuple[int, bytes]]:
    """``n`` HTTP answers (status, body) from a raw socket; fails if it closes first."""
    buf = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < n:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode()
            length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            if len(buf) >= end + 4 + length:
                out.append((int(head.split()[1]), buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {len(out)} answers"
        buf += chunk
    return out


def rss_kib(pid: int) -> int:
    """The resident set of a process (KiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
