"""The end-to-end harness: a private Redis, real Kamailio proxies started with
``deploy/kamailio/run``, SIPp UAS/UAC processes, and policer's CLI for counts.

Everything listens on 127.0.0.1 on free ports; every process a test starts is
stopped when the test ends (its whole process group, so Kamailio's workers go
too). :class:`Lab` is the entry point (``tests/e2e/conftest.py``'s ``lab``
fixture builds one per Kamailio flavour, ``native`` and ``kemi``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import proxy as proxy_tool
from lab.processes import stop_group
from lab.proxy import DEPLOY, KAMAILIO, KAMCMD
from lab.redis_server import find_redis_server, free_media_ports, free_udp_port
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = DEPLOY / "sipp"
POLICIES = ROOT / "tests" / "e2e" / "policies"
FLAVOURS = ("native", "kemi")

SIPP = shutil.which("sipp") or "/usr/bin/sipp"
APP_PYTHON3 = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so")


def missing_tools() -> list[str]:
    missing = [
        name
        for name, path in (("kamailio", KAMAILIO), ("kamcmd", KAMCMD), ("sipp", SIPP))
        if not os.access(path, os.X_OK)
    ]
    if find_redis_server() is None:
        missing.append("redis-server")
    modules = Path("/usr/lib").glob("*/kamailio/modules/app_python3.so")
    if not APP_PYTHON3.exists() and not list(modules):
        missing.append("kamailio-python3-modules")
    return missing


def udp_port_bound(port: int, host: str = "127.0.0.1") -> bool:
    """Whether some process has a UDP socket bound to ``host:port`` (Linux's
    /proc/net/udp), without touching the port."""
    want = f"{socket.htonl(int(ipaddress.IPv4Address(host))):08X}:{port:04X}"
    anywhere = f"00000000:{port:04X}"
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] in (want, anywhere) for line in lines)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: missing)"
    return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------- processes


@dataclass
class Proxy:
    """One Kamailio instance started by deploy/kamailio/run."""

    flavour: str
    node: str
    port: int
    upstream_port: int
    runtime_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kamcmd(self, *args: str, timeout: float = 5) -> str:
        return proxy_tool.kamcmd(self.runtime_dir, *args, timeout=timeout)

    def active_dialogs(self) -> int:
        return proxy_tool.active_dialogs(self.runtime_dir)

    def alive(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list[int]:
        """Pids of every live process of this Kamailio (its process group)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text[text.rfind(")") + 2 :].split()
            if int(fields[2]) == self.process.pid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids

    def kill9(self) -> None:
        """Crash: SIGKILL to every process of the group at once (main, workers, timers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_group(self.process)


@dataclass
class UacResult:
    """What one SIPp UAC run saw, from its log lines (see deploy/kamailio/sipp/uac.xml)."""

    returncode: int
    answered: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    #: (code, reason, Retry-After, Call-ID) of each rejected call
    rejected: list[tuple[int, str, str, str]] = field(default_factory=list)
    output: str = ""
    calls: Sequence[tuple[str, str, str]] = ()

    def codes(self) -> list[int]:
        return sorted(r[0] for r in self.rejected)

    def call_of(self, call_id: str) -> tuple[str, str, str]:
        """The CSV line (user, account, number) call ``call_id`` used (SEQUENTIAL)."""
        number = int(call_id.split("-", 1)[0])
        return self.calls[(number - 1) % len(self.calls)]

    def answered_calls(self) -> list[tuple[str, str, str]]:
        return [self.call_of(c) for c in self.answered]

    def rejected_calls(self) -> list[tuple[tuple[str, str, str], int, str]]:
        return [(self.call_of(cid), code, reason) for code, reason, _, cid in self.rejected]


_REJECTED = re.compile(r"^REJECTED (\d+) (.*) retry=(\d*) (\S+)$")


def parse_uac_log(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"answered": [], "ended": [], "cancelled": [], "rejected": []}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if m := _REJECTED.match(line):
            out["rejected"].append((int(m.group(1)), m.group(2).strip(), m.group(3), m.group(4)))
        elif line.startswith("ANSWERED "):
            out["answered"].append(line.split()[1])
        elif line.startswith("ENDED "):
            out["ended"].append(line.split()[1])
        elif line.startswith("CANCELLED "):
            out["cancelled"].append(line.split()[1])
    return out


class Uac:
    """A SIPp UAC running in the background; ``result()`` waits for it."""

    def __init__(
        self,
        lab: Lab,
        process: subprocess.Popen[bytes],
        log: Path,
        screen: Path,
        calls: Sequence[tuple[str, str, str]],
        timeout: float,
    ) -> None:
        self.lab = lab
        self.process = process
        self.log = log
        self.screen = screen
        self.calls = calls
        self.deadline = time.monotonic() + timeout

    def result(self) -> UacResult:
        try:
            rc = self.process.wait(timeout=max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_group(self.process, signal.SIGKILL)
            rc = -9
        parsed = parse_uac_log(self.log)
        return UacResult(returncode=rc, output=tail(self.screen, 60), calls=self.calls, **parsed)


@dataclass
class Uas:
    scenario: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        stop_group(self.process, timeout=5)


class Lab:
    """One test's world: its policy (own namespace), proxies, SIPp and the CLI."""

    def __init__(self, flavour: str, redis_url: str, workdir: Path) -> None:
        self.flavour = flavour
        self.redis_url = redis_url
        self.workdir = workdir
        self.policy_path: Path | None = None
        self.namespace = ""
        self.proxies: list[Proxy] = []
        self.uases: list[Uas] = []
        self.uacs: list[Uac] = []
        self._runtime_dirs: list[Path] = []
        self._seq = 0

    # -- policy and CLI
    def use_policy(self, name: str) -> Path:
        """Copy tests/e2e/policies/NAME.yaml with a namespace of its own."""
        return self.use_policy_file(POLICIES / f"{name}.yaml")

    def use_policy_file(self, source: Path) -> Path:
        """Copy a policy file with a namespace of its own."""
        name = source.stem
        text = source.read_text()
        self.namespace = f"e2e{os.getpid()}{time.monotonic_ns() % 10**9}"
        text, n = re.subn(r"(?m)^namespace:.*$", f"namespace: {self.namespace}", text)
        assert n == 1, f"{name}.yaml needs one top-level namespace line"
        path = self.workdir / f"{name}.yaml"
        path.write_text(text)
        self.policy_path = path
        return path

    def policer(self, *args: str, timeout: float = 20) -> str:
        assert self.policy_path is not None
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "policer",
                *args,
                "--redis",
                self.redis_url,
                "--policy",
                str(self.policy_path),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        if out.returncode != 0:
            raise RuntimeError(f"policer {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out.stdout

    def size(self, profile: str, value: str | None = None) -> int:
        return int(self.policer("profile", "size", profile, *([value] if value else [])).strip())

    def stats(self) -> dict[str, int]:
        data: dict[str, int] = json.loads(self.policer("stats", "--json"))
        return data

    def cdrs(self) -> list[dict[str, Any]]:
        out = self.policer("cdr", "tail", "-n", "0", "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_size(
        self, profile: str, expected: int, timeout: float = 10, value: str | None = None
    ) -> int:
        """Poll a profile size until it equals ``expected``; return the last size."""
        last = -1

        def check() -> bool:
            nonlocal last
            last = self.size(profile, value)
            return last == expected

        wait_for(check, timeout, interval=0.2)
        return last

    # -- processes
    def start_proxy(
        self,
        *,
        upstream_port: int,
        node: str | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20,
    ) -> Proxy:
        assert self.policy_path is not None, "use_policy() first"
        port = free_udp_port()
        node = node or f"{self.flavour}-{port}"
        runtime = Path(tempfile.mkdtemp(prefix="pk-"))  # short: unix socket paths
        self._runtime_dirs.append(runtime)
        log = self.workdir / f"kamailio-{node}.log"
        full_env = proxy_tool.proxy_env(
            policy=self.policy_path, redis_url=self.redis_url, port=port,
            upstream_port=upstream_port, flavour=self.flavour, node=node, runtime=runtime,
            children=2, shm_mb=64, extra=env)
        proc = proxy_tool.start_proxy(full_env, log)
        proxy = Proxy(self.flavour, node, port, upstream_port, runtime, log, proc)
        self.proxies.append(proxy)

        def ready() -> bool:
            if not proxy.alive():
                raise RuntimeError(f"kamailio exited ({proc.returncode}):\n{tail(log)}")
            return proxy_tool.ready(runtime)

        if not wait_for(ready, ready_timeout, interval=0.1):
            raise RuntimeError(f"kamailio not ready in {ready_timeout}s:\n{tail(log)}")
        return proxy

    def start_uas(self, scenario: str, port: int | None = None) -> Uas:
        port = port or free_udp_port()
        self._seq += 1
        log = self.workdir / f"uas-{self._seq}-{scenario}.log"
        proc = subprocess.Popen(
            [
                SIPP,
                "-sf",
                str(SCENARIOS / scenario),
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "-mp",
                str(free_media_ports()),
                "-trace_logs",
                "-log_file",
                str(log),
                "-nostdin",
                "-trace_err",
                "-error_file",
                str(log.with_suffix(".err")),
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        uas = Uas(scenario, port, log, proc)
        self.uases.append(uas)

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sipp UAS {scenario} exited {proc.returncode}: "
                                   f"{tail(log.with_suffix('.err'))}")
            return udp_port_bound(port)

        if not wait_for(listening, 10, interval=0.02):
            raise RuntimeError(f"sipp UAS {scenario} not listening on {port} in 10s")
        return uas

    def start_uac(
        self,
        proxy: Proxy,
        calls: Sequence[tuple[str, str, str]],
        *,
        scenario: str = "uac.xml",
        count: int | None = None,
        hold_ms: int = 0,
        rate: int = 200,
        concurrent: int | None = None,
        timeout: float = 40,
        extra: Sequence[str] = (),
    ) -> Uac:
        """Place ``count`` calls (default one per CSV line) through ``proxy``."""
        self._seq += 1
        csv = self.workdir / f"uac-{self._seq}.csv"
        csv.write_text("SEQUENTIAL\n" + "".join(f"{u};{a};{n};\n" for u, a, n in calls))
        log = self.workdir / f"uac-{self._seq}-{scenario}.log"
        screen = self.workdir / f"uac-{self._seq}-{scenario}.screen"
        count = count or len(calls)
        args = [
            SIPP,
            proxy.address,
            "-sf",
            str(SCENARIOS / scenario),
            "-inf",
            str(csv),
            "-i",
            "127.0.0.1",
            "-p",
            str(free_udp_port()),
            "-mp",
            str(free_media_ports()),
            "-m",
            str(count),
            "-l",
            str(concurrent or count),
            "-r",
            str(rate),
            "-d",
            str(hold_ms),
            "-trace_logs",
            "-log_file",
            str(log),
            "-nostdin",
            "-timeout",
            f"{int(timeout)}s",
            "-timeout_error",
            "-recv_timeout",
            "30000",
            *extra,
        ]
        with screen.open("wb") as fh:
            proc = subprocess.Popen(
                args,
                cwd=self.workdir,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        uac = Uac(self, proc, log, screen, list(calls), timeout + 5)
        self.uacs.append(uac)
        return uac

    def run_uac(self, proxy: Proxy, calls: Sequence[tuple[str, str, str]], **kw: Any) -> UacResult:
        return self.start_uac(proxy, calls, **kw).result()

    # -- teardown
    def diagnostics(self) -> str:
        parts = []
        for p in self.proxies:
            parts.append(f"--- kamailio {p.node} ({p.log}):\n{tail(p.log, 60)}")
        for u in self.uases:
            errors = tail(u.log.with_suffix(".err"), 10)
            parts.append(f"--- uas {u.scenario}:\n{tail(u.log, 20)}\n{errors}")
        for c in self.uacs:
            parts.append(f"--- uac {c.log.name}:\n{tail(c.log, 20)}")
        return "\n".join(parts)

    def close(self) -> None:
        for uac in self.uacs:
            if uac.process.poll() is None:
                stop_group(uac.process, signal.SIGKILL)
        for uas in self.uases:
            uas.stop()
        for proxy in self.proxies:
            proxy.stop()
        for d in self._runtime_dirs:
            shutil.rmtree(d, ignore_errors=True)
