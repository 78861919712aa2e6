"""Network faults for the fault matrix (:mod:`lab.chaos`): a network namespace joined to
this host by a veth pair, iptables rules (a partition, packet loss, a stable loopback
address that follows a Redis primary) and a TCP relay that adds latency.

Everything is named after the process that made it (``pchaos-<pid>``, ``pcx<pid>h``,
``PCHAOS<pid>``), and :func:`cleanup_leftovers` removes what a process that is no longer
running left behind, never another live run's. Traffic only flows on loopback and on
the addresses made here (``10.77.<n>.1`` on this side, ``10.77.<n>.2`` in the
namespace).

This kernel has no ``sch_netem`` (``CONFIG_NET_SCH_NETEM`` is not set and modules cannot
be loaded), so ``tc netem`` cannot delay packets: latency is added by :class:`Relay`, a
user-space TCP relay on the veth address that holds every chunk for half the added
round trip in each direction. Loss and partitions are iptables ``DROP`` rules on the
veth link (``-m statistic`` for loss).

``python -m lab.netfault relay --listen HOST:PORT --to HOST:PORT --delay-file FILE``
runs the relay (SIGHUP: read the added round trip, ms, from FILE again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lab.processes import stop_group

__all__ = ["Firewall", "NetNs", "Relay", "cleanup_leftovers", "run"]

IP = "/usr/sbin/ip"
IPTABLES = "/usr/sbin/iptables"
PREFIX_NS = "pchaos-"
PREFIX_LINK = "pcx"
PREFIX_CHAIN = "PCHAOS"


def run(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """A command; RuntimeError with its output when it fails (``check``)."""
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {out.returncode}: "
                           f"{(out.stderr or out.stdout).strip()}")
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live run of this tool (a pid reused by another program
    does not count)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"chaos" in cmdline or b"pytest" in cmdline


def available() -> list[str]:
    """What is missing to make namespaces and rules here (empty: all there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, iptables)")
    for tool in (IP, IPTABLES):
        if not os.access(tool, os.X_OK):
            missing.append(tool + " (Debian: iproute2, iptables)")
    return missing


class NetNs:
    """A network namespace joined to this host by a veth pair: ``host_ip`` on this
    side, ``ns_ip`` inside. :meth:`exec_prefix` runs a command inside."""

    def __init__(self, owner: int | None = None) -> None:
        self.owner = owner or os.getpid()
        self.name = f"{PREFIX_NS}{self.owner}"
        self.host_link = f"{PREFIX_LINK}{self.owner}h"
        self.ns_link = f"{PREFIX_LINK}{self.owner}n"
        self.subnet = 0
        self.created = False

    @property
    def host_ip(self) -> str:
        return f"10.77.{self.subnet}.1"

    @property
    def ns_ip(self) -> str:
        return f"10.77.{self.subnet}.2"

    def _free_subnet(self) -> int:
        used = set(re.findall(r"\b10\.77\.(\d+)\.", run(IP, "-4", "-o", "addr", "show").stdout))
        routes = run(IP, "-4", "route", "show").stdout
        used |= set(re.findall(r"\b10\.77\.(\d+)\.", routes))
        start = self.owner % 200 + 20
        for n in [*range(start, 250), *range(1, start)]:
            if str(n) not in used:
                return int(n)
        raise RuntimeError("no free 10.77.x.0/24 subnet for the namespace")

    def create(self) -> NetNs:
        self.subnet = self._free_subnet()
        self.created = True  # destroy() removes whatever part exists
        run(IP, "netns", "add", self.name)
        run(IP, "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
        run(IP, "link", "set", self.ns_link, "netns", self.name)
        run(IP, "addr", "add", f"{self.host_ip}/24", "dev", self.host_link)
        run(IP, "link", "set", self.host_link, "up")
        run(IP, "-n", self.name, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_link)
        run(IP, "-n", self.name, "link", "set", self.ns_link, "up")
        run(IP, "-n", self.name, "link", "set", "lo", "up")
        return self

    def exec_prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.name]

    def destroy(self) -> None:
        if not self.created:
            return
        run(IP, "link", "del", self.host_link, check=False)
        run(IP, "netns", "del", self.name, check=False)
        self.created = False


class Firewall:
    """This run's iptables rules: a chain in ``filter`` jumped to only for packets on
    the veth link (partition, loss), and a chain in ``nat`` jumped to only for one
    loopback port (a stable address DNATed to a Redis primary)."""

    def __init__(self, owner: int | None = None) -> None:
        self.owner = owner or os.getpid()
        self.chain = f"{PREFIX_CHAIN}{self.owner}"
        self.nat_chain = f"{PREFIX_CHAIN}NAT{self.owner}"
        self.link: str | None = None
        self.stable_port: int | None = None
        self.target_port: int | None = None
        self._filter = False

    def _filter_jumps(self) -> list[list[str]]:
        assert self.link is not None
        return [["INPUT", "-i", self.link, "-j", self.chain],
                ["OUTPUT", "-o", self.link, "-j", self.chain]]

    def attach(self, link: str) -> None:
        """Rules for packets on ``link`` (the veth's host side) go through our chain."""
        self.link = link
        run(IPTABLES, "-N", self.chain)
        self._filter = True
        for jump in self._filter_jumps():
            run(IPTABLES, "-I", *jump)

    def drop(self, port: int, probability: float | None = None) -> None:
        """Drop TCP packets to and from ``port`` on the link (all of them: a partition;
        with ``probability``: that share, random, a lossy link)."""
        assert self.link is not None
        stat = ([] if probability is None else
                ["-m", "statistic", "--mode", "random", "--probability", f"{probability:.3f}"])
        run(IPTABLES, "-A", self.chain, "-i", self.link, "-p", "tcp", "--dport", str(port),
            *stat, "-j", "DROP")
        run(IPTABLES, "-A", self.chain, "-o", self.link, "-p", "tcp", "--sport", str(port),
            *stat, "-j", "DROP")

    def heal(self) -> None:
        if self._filter:
            run(IPTABLES, "-F", self.chain)

    def rules(self) -> str:
        out = []
        if self._filter:
            out.append(run(IPTABLES, "-S", self.chain, check=False).stdout)
        if self.stable_port is not None:
            out.append(run(IPTABLES, "-t", "nat", "-S", self.nat_chain, check=False).stdout)
        return "".join(out)

    def _nat_jump(self) -> list[str]:
        return ["OUTPUT", "-d", "127.0.0.1/32", "-p", "tcp", "--dport", str(self.stable_port),
                "-j", self.nat_chain]

    def stable_address(self, stable_port: int, target_port: int) -> None:
        """127.0.0.1:``stable_port`` reaches 127.0.0.1:``target_port`` (DNAT on loopback;
        :meth:`repoint` moves it)."""
        run(IPTABLES, "-t", "nat", "-N", self.nat_chain)
        self.stable_port = stable_port
        run(IPTABLES, "-t", "nat", "-A", self.nat_chain, "-p", "tcp", "-j", "DNAT",
            "--to-destination", f"127.0.0.1:{target_port}")
        run(IPTABLES, "-t", "nat", "-I", *self._nat_jump())
        self.target_port = target_port

    def repoint(self, target_port: int) -> None:
        """New connections to the stable address go to ``target_port`` (one rule
        replaced in place: never a moment without it)."""
        run(IPTABLES, "-t", "nat", "-R", self.nat_chain, "1", "-p", "tcp", "-j", "DNAT",
            "--to-destination", f"127.0.0.1:{target_port}")
        self.target_port = target_port

    def destroy(self) -> None:
        if self._filter and self.link is not None:
            for jump in self._filter_jumps():
                while run(IPTABLES, "-D", *jump, check=False).returncode == 0:
                    pass
            run(IPTABLES, "-F", self.chain, check=False)
            run(IPTABLES, "-X", self.chain, check=False)
            self._filter = False
        if self.stable_port is not None:
            while run(IPTABLES, "-t", "nat", "-D", *self._nat_jump(),
                      check=False).returncode == 0:
                pass
            run(IPTABLES, "-t", "nat", "-F", self.nat_chain, check=False)
            run(IPTABLES, "-t", "nat", "-X", self.nat_chain, check=False)
            self.stable_port = None


def cleanup_leftovers() -> list[str]:
    """Remove the namespaces, veth links and iptables chains of runs that are no longer
    running (a run killed before its own clean-up). Returns what was removed."""
    removed: list[str] = []
    if available():
        return removed
    for line in run(IP, "netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"^{PREFIX_NS}(\d+)\b", line)
        if m and not _alive(int(m.group(1))):
            run(IP, "netns", "del", f"{PREFIX_NS}{m.group(1)}", check=False)
            removed.append(f"netns {PREFIX_NS}{m.group(1)}")
    for line in run(IP, "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"^\d+:\s+({PREFIX_LINK}(\d+)h)[@:]", line)
        if m and not _alive(int(m.group(2))):
            run(IP, "link", "del", m.group(1), check=False)
            removed.append(f"link {m.group(1)}")
    for table in ("filter", "nat"):
        rules = run(IPTABLES, "-t", table, "-S", check=False).stdout.splitlines()
        for line in rules:
            m = re.match(rf"^-N ({PREFIX_CHAIN}(?:NAT)?(\d+))$", line)
            if not m or _alive(int(m.group(2))):
                continue
            chain = m.group(1)
            for rule in rules:  # the jumps to it
                if rule.startswith("-A ") and rule.endswith(f"-j {chain}"):
                    run(IPTABLES, "-t", table, "-D", *rule[3:].split(), check=False)
            run(IPTABLES, "-t", table, "-F", chain, check=False)
            run(IPTABLES, "-t", table, "-X", chain, check=False)
            removed.append(f"iptables {table} {chain}")
    return removed


# ----------------------------------------------------------------------------- relay


class Relay:
    """A TCP relay process (this module's ``relay`` command) from ``listen`` to ``to``
    that adds :meth:`set_delay` ms to the round trip."""

    def __init__(self, listen: tuple[str, int], to: tuple[str, int], workdir: Path) -> None:
        self.listen = listen
        self.to = to
        self.delay_file = workdir / f"relay-{listen[1]}.delay"
        self.log = workdir / f"relay-{listen[1]}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.delay_ms = 0

    def start(self) -> Relay:
        self.delay_file.write_text("0")
        with self.log.open("wb") as fh:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lab.netfault", "relay",
                 "--listen", f"{self.listen[0]}:{self.listen[1]}",
                 "--to", f"{self.to[0]}:{self.to[1]}", "--delay-file", str(self.delay_file)],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited: {self.log.read_text(errors='replace')}")
            if "listening" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("relay did not start in 10 s")

    def set_delay(self, ms: int) -> None:
        assert self.process is not None
        self.delay_file.write_text(str(ms))
        self.process.send_signal(signal.SIGHUP)
        self.delay_ms = ms

    def stop(self) -> None:
        stop_group(self.process, timeout=5)
        self.process = None


class _Delay:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.half_s = 0.0
        self.read()

    def read(self) -> None:
        try:
            self.half_s = max(0.0, float(self.path.read_text().strip() or 0)) / 2000
        except (OSError, ValueError):
            self.half_s = 0.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: _Delay) -> None:
    """Copy reader to writer, each chunk sent ``delay.half_s`` after it arrived (in
    order); the writer's side is closed when the reader's ends."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay.half_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def _relay_main(listen: tuple[str, int], to: tuple[str, int], delay: _Delay) -> None:
    async def client(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.wait_for(asyncio.open_connection(*to), 5)
        except (OSError, TimeoutError):
            w1.close()
            return
        await asyncio.gather(_pump(r1, w2, delay), _pump(r2, w1, delay))

    server = await asyncio.start_server(client, listen[0], listen[1], reuse_address=True)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, delay.read)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"relay listening on {listen[0]}:{listen[1]} -> {to[0]}:{to[1]}", flush=True)
    async with server:
        await stop.wait()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.netfault")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="a TCP relay adding latency (SIGHUP: re-read the delay)")
    r.add_argument("--listen", required=True)
    r.add_argument("--to", required=True)
    r.add_argument("--delay-file", required=True, type=Path)
    sub.add_parser("cleanup", help="remove what runs no longer running left behind")
    args = p.parse_args(argv)
    if args.cmd == "cleanup":
        for what in cleanup_leftovers():
            print("removed", what)
        return 0
    asyncio.run(_relay_main(_hostport(args.listen), _hostport(args.to), _Delay(args.delay_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
