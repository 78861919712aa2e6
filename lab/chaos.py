"""The fault matrix (issue 15 item 4): real Redis, real Kamailio proxies, SIPp callers,
one fault after another while the calls go on, and what each fault did to the counts.

    .venv/bin/python -m lab.chaos [--flavour native|kemi|http|all] [--json FILE]
                                   [--faults NAME,...] [--rate N] [--hold S] [--quick]

The world (one per flavour; the Sentinel failover gets a second one):

- a private ``redis-server`` (``--appendonly yes``, ``--enable-debug-command local``);
  for the failover a primary, a replica and three sentinels (quorum 2);
- two Kamailio proxies started by ``deploy/kamailio/run`` (nodes ``chaos-a`` and
  ``chaos-b``); when a fault cuts one proxy off, ``chaos-b`` runs in a network namespace
  this tool makes (:mod:`lab.netfault`) and reaches Redis over a veth link;
- a SIPp UAS per proxy (``uas.xml``: it echoes Record-Route), and per proxy a SIPp UAC
  of ordinary calls (``chaos_uac.xml``: 30 users in 4 accounts, 1 in 5 calls
  international) and a trickle of emergency calls (112, user ``sos-<proxy>``, account
  ``emergency``), at the stated rates and hold times;
- a policy whose calls join four profiles (``total``, a class, ``user``, ``account``)
  with limits sized to trip at that load, ``store_timeout: 50ms``, ``on_store_error:
  reject``, early timeout 120 s and a 5 s node lease.

What is measured (see :func:`analyse`): the tool samples, every ``--sample`` seconds,
the dialog ids Redis counts (the live members of the ``total`` zset, and every
profile's count, in one script) between two reads of each proxy's own dialogs
(``dlg.briefing`` over its JSON-RPC socket). From those samples: over-admissions (a profile
holding more ordinary calls than its max, while Redis answered), ghosts (ids Redis
counts that no proxy carries, across 1 s) and uncounted calls (the reverse), and when
the count became the live calls again after the fault. SIPp's logs give every call's
fate; a follower of the call-end record stream (what ``policer cdr tail -f`` reads)
gives the records, compared by Call-ID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lab import netfault
from lab.processes import stop_group
from lab.proxy import KAMAILIO, KAMCMD, RUN, proxy_env
from lab.proxy import ready as proxy_ready
from lab.redis_server import (
    RedisServer,
    find_redis_server,
    free_media_ports,
    free_port,
    free_udp_port,
)
from policer.protocol import unpack_record
from policer.reconcile import fetch_dialogs
from policer.store import RedisStore, StoreError
from policer.store.keys import Keys, dialog_id

__all__ = ["FAULTS", "FlavourResult", "Options", "RowResult", "main", "run_flavour"]

ROOT = Path(__file__).resolve().parent.parent
SIPP = shutil.which("sipp") or "/usr/bin/sipp"
SCENARIOS = ROOT / "deploy" / "kamailio" / "sipp"
FLAVOURS = ("native", "kemi", "http")
SERVICE = "policer"  # the Sentinel service name

USERS = [f"u{i:02d}" for i in range(30)]
ACCOUNTS = ["acc0", "acc1", "acc2", "acc3"]
LOCAL_NUMBER = "5551234"
INTERNATIONAL_NUMBER = "00493012345678"
EMERGENCY_NUMBER = "112"
EMERGENCY_ACCOUNT = "emergency"
#: the reasons of the policy's own rejections (limits, its fallback, an ended dialog)
FALLBACK_REASON = "Call Limit Reached"
LIMIT_REASONS = {"Total Limit": "total", "International Limit": "international",
                 "Account Limit": "account", "User Limit": "user"}
ENDED_REASON = "Request Terminated"


# ----------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class FaultSpec:
    name: str
    title: str
    length: str
    #: the count must equal the live calls within this many seconds after Redis answers
    #: again (the issue's bounds: 2 s after pauses, spikes, killed connections; 5 s after
    #: an empty restart or a failover. This tool's own: 5 s after an AOF restart, a
    #: partition and a proxy's restart; 2 s after added latency or loss)
    target_s: float
    world: str = "single"  # single | sentinel
    netns: bool = False  # cuts proxy chaos-b off: it runs in a namespace of its own


FAULTS: dict[str, FaultSpec] = {f.name: f for f in (
    FaultSpec("none", "no fault (steady load)", "-", 2),
    FaultSpec("pause-0.2", "Redis paused (SIGSTOP/SIGCONT)", "0.2 s", 2),
    FaultSpec("pause-1", "Redis paused (SIGSTOP/SIGCONT)", "1 s", 2),
    FaultSpec("pause-5", "Redis paused (SIGSTOP/SIGCONT)", "5 s", 2),
    FaultSpec("spikes", "Redis latency spikes: DEBUG SLEEP 0.08 twice a second", "10 s", 2),
    FaultSpec("restart-empty", "Redis killed -9, started empty (same port)", "restart", 5),
    FaultSpec("restart-aof", "Redis killed -9, restarted from its AOF", "restart", 5),
    FaultSpec("client-kill", "the proxies' Redis connections killed (CLIENT KILL TYPE "
              "normal)", "instant", 2),
    FaultSpec("partition", "chaos-b cut off Redis (iptables DROP on its veth link)", "8 s", 5,
              netns=True),
    FaultSpec("latency-20", "chaos-b <-> Redis round trip +20 ms (relay on its link)", "5 s",
              2, netns=True),
    FaultSpec("latency-200", "chaos-b <-> Redis round trip +200 ms (relay on its link)",
              "5 s", 2, netns=True),
    FaultSpec("loss-30", "chaos-b <-> Redis 30 % of packets dropped (iptables statistic)",
              "5 s", 2, netns=True),
    FaultSpec("proxy-kill", "proxy chaos-a killed -9 (its process group), started again",
              "2 s down", 5),
    FaultSpec("failover", "Sentinel failover: the primary killed -9, the replica promoted",
              "failover", 5, world="sentinel"),
)}
#: each fault as the table names it
LABELS = {
    "none": "none (steady load)",
    "pause-0.2": "Redis paused 0.2 s",
    "pause-1": "Redis paused 1 s",
    "pause-5": "Redis paused 5 s",
    "spikes": "DEBUG SLEEP 0.08 twice a second, 10 s",
    "restart-empty": "Redis killed -9, started empty",
    "restart-aof": "Redis killed -9, restarted from its AOF",
    "client-kill": "CLIENT KILL TYPE normal",
    "partition": "chaos-b cut off Redis, 8 s",
    "latency-20": "chaos-b to Redis +20 ms, 5 s",
    "latency-200": "chaos-b to Redis +200 ms, 5 s",
    "loss-30": "chaos-b to Redis 30 % loss, 5 s",
    "proxy-kill": "chaos-a killed -9, started 2 s later",
    "failover": "Sentinel failover (primary killed -9)",
}
DEFAULT_FAULTS = list(FAULTS)
QUICK_FAULTS = ["pause-1", "restart-empty"]


@dataclass
class Options:
    flavour: str = "native"
    faults: list[str] = field(default_factory=lambda: list(DEFAULT_FAULTS))
    #: ordinary calls per second through each proxy, and how long each answered one lasts
    rate: float = 60.0
    hold_s: float = 1.5
    #: emergency calls per second through each proxy, and their hold time
    emergency_rate: float = 0.5
    emergency_hold_s: float = 8.0
    warmup_s: float = 5.0
    recovery_s: float = 9.0
    sample_s: float = 0.15
    lease_s: int = 5
    children: int = 4  # SIP worker processes per proxy (deploy/kamailio/run's default)
    workdir: Path | None = None
    keep: bool = False
    verbose: bool = True
    #: write Redis's MONITOR stream to <workdir>/monitor.log (diagnostics; costs Redis CPU)
    monitor: bool = False

    def limits(self, proxies: int = 2) -> dict[str, int]:
        """Limits sized to trip at this load: offered ``proxies * rate * hold`` calls up."""
        offered = proxies * self.rate * self.hold_s
        return {
            "total": max(4, round(offered * 0.7)),
            "international": max(2, round(offered * 0.2 * 0.7)),
            "account": max(2, round(offered / len(ACCOUNTS) * 0.8)),
            "user": max(1, round(offered / len(USERS) * 0.8)),
        }


POLICY = """\
# lab/chaos.py: the fault matrix's policy. Calls join four profiles (total, a class,
# user, account) with limits sized to trip at the load; a 50 ms store bound and
# on_store_error: reject; emergency calls (112) bypass every limit.
version: 1
namespace: {namespace}
call:
  number: ruri_user
  attributes:
    account: header:X-Account
classes:
  emergency: {{numbers: ["{emergency}"]}}
  international: {{prefixes: ["00"]}}
  local: {{default: true}}
profiles:
  total: {{}}
  international: {{when: {{class: international}}}}
  local: {{when: {{class: local}}}}
  user: {{value: from_user}}
  account: {{value: account}}
limits:
  total: {{max: {total}, reject: {{code: 503, reason: "Total Limit"}}}}
  international: {{max: {international}, reject: {{code: 403, reason: "International Limit"}}}}
  account: {{max: {account}, reject: {{code: 486, reason: "Account Limit"}}}}
  user: {{max: {user}, reject: {{code: 486, reason: "User Limit"}}}}
emergency: {{class: emergency, bypass: true}}
timeouts: {{early: 120s, dialog: 60s}}
reject: {{code: 503, reason: "{fallback}"}}
on_store_error: reject
store_timeout: 50ms
nodes: {{lease: {lease}s, renew: 1s}}
"""


def log(opts: Options, message: str) -> None:
    if opts.verbose:
        print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: missing)"


def _wait(what: str, ok: Callable[[], object], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _client(port: int, timeout: float = 0.3, host: str = "127.0.0.1",
            decode: bool = False) -> redis.Redis:
    """A client that fails at once (no retries): a sample during a fault must say so."""
    return redis.Redis(host=host, port=port, socket_timeout=timeout,
                       socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                       decode_responses=decode)


# ----------------------------------------------------------------------------- Redis


class ChaosRedis(RedisServer):
    """The single Redis: AOF on (the AOF restart row), DEBUG allowed from loopback (the
    latency spikes)."""

    def __init__(self) -> None:
        super().__init__(extra_args=["--appendonly", "yes", "--appendfsync", "everysec",
                                     "--enable-debug-command", "local"])

    def wipe(self) -> None:
        """Remove what a restart would load (the AOF directory, an RDB file)."""
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "dump.rdb").unlink()


class SentinelProc(RedisServer):
    """One ``redis-server --sentinel``: down after 1 s, failover timeout 5 s."""

    def __init__(self, primary_port: int) -> None:
        super().__init__()
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n"
            f"dir {self.dir}\nlogfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n")

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary, str(self.conf), "--sentinel"]


class SentinelSet:
    """A primary, a replica and three sentinels on loopback (as tests/test_ha.py)."""

    def __init__(self) -> None:
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelProc] = []
        self.primary: RedisServer | None = None

    def start(self) -> SentinelSet:
        try:
            return self._start()
        except BaseException:
            self.stop()  # whatever was started
            raise

    def _start(self) -> SentinelSet:
        primary = RedisServer()
        self.servers.append(primary)
        primary.start()
        self.primary = primary
        replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        self.servers.append(replica)
        replica.start()

        def linked() -> bool:
            try:
                info = _client(replica.port, 1, decode=True).info("replication")
            except redis.RedisError:
                return False
            return bool(info.get("master_link_status") == "up")

        _wait("the replica's link", linked, 20)
        for _ in range(3):
            s = SentinelProc(primary.port)
            self.sentinels.append(s)
            s.start()

        def known() -> bool:
            for s in self.sentinels:
                try:
                    m = _client(s.port, 1, decode=True).execute_command("SENTINEL", "MASTER",
                                                                        SERVICE)
                except redis.RedisError:
                    return False
                state = (dict(zip(m[::2], m[1::2], strict=False)) if isinstance(m, list)
                         else m)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
            return True

        _wait("the sentinels to know each other and the replica", known, 30, 0.2)
        return self

    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int | None:
        for s in self.sentinels:
            try:
                addr = _client(s.port, 0.5, decode=True).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    def server(self, port: int) -> RedisServer | None:
        return next((s for s in self.servers if s.port == port), None)

    def stop(self) -> None:
        for p in (*self.sentinels, *self.servers):
            p.stop()


# ----------------------------------------------------------------------------- processes


@dataclass
class ProxyProc:
    """One Kamailio proxy (``deploy/kamailio/run``), perhaps inside a namespace."""

    name: str
    node: str
    flavour: str
    ip: str
    port: int
    upstream: str
    redis_url: str
    runtime: Path
    log: Path
    env: dict[str, str]
    netns: netfault.NetNs | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def fifo(self) -> str:
        return f"fifo:{self.runtime}/kamailio_rpc.fifo"

    def start(self, timeout: float = 30) -> float:
        """Start it and wait until it answers on its control socket; the time it did."""
        self.starts += 1
        prefix = self.netns.exec_prefix() if self.netns else []
        with self.log.open("ab") as fh:
            fh.write(f"\n===== chaos: start {self.starts} at {time.time():.3f}\n".encode())
            fh.flush()
            self.process = subprocess.Popen(
                [*prefix, str(RUN)], env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"kamailio {self.node} exited ({self.process.returncode}):"
                                   f"\n{_tail(self.log)}")
            return proxy_ready(self.runtime)

        _wait(f"kamailio {self.node}", up, timeout, 0.1)
        return time.time()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_group(self.process)

    def dialog_ids(self) -> frozenset[str] | None:
        """The ids of the dialogs it carries now (empty when it is not running); None
        when it is running but did not say."""
        if not self.alive():
            return frozenset()
        try:
            return _briefing(self.runtime / "kamailio_rpc.sock")
        except (OSError, ValueError):
            pass
        try:  # a reply too big for a datagram: the FIFO, with every dialog's details
            return frozenset(_intern(d.dialog_id) for d in fetch_dialogs(self.fifo, 1.0))
        except (OSError, ValueError):
            return frozenset() if not self.alive() else None

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0


_INTERNED: dict[str, str] = {}
_LIVE_STATES = (1, 2, 3, 4)  # dlg states: unconfirmed, early, confirmed, confirmed (ACKed)


def _briefing(path: Path, timeout: float = 1.0) -> frozenset[str]:
    """The ids of a Kamailio's live dialogs: ``dlg.briefing`` (Call-ID, From-tag and
    state only) over its JSON-RPC datagram socket."""
    reply = path.parent / f"chaos-rpc-{os.getpid()}-{threading.get_ident()}.sock"
    with contextlib.suppress(FileNotFoundError):
        reply.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(reply))
        try:
            s.settimeout(timeout)
            s.sendto(b'{"jsonrpc":"2.0","method":"dlg.briefing","params":["cFs"],"id":1}',
                     str(path))
            data = s.recv(1 << 17)
        finally:
            reply.unlink()
    result = json.loads(data).get("result")
    if not isinstance(result, list):
        raise ValueError(f"dlg.briefing: {data[:200]!r}")
    return frozenset(_intern(dialog_id(d["call-id"], d["from_tag"])) for d in result
                     if isinstance(d, dict) and d.get("state") in _LIVE_STATES)


def _intern(s: str) -> str:
    return _INTERNED.setdefault(s, s)


@dataclass
class CallLog:
    """One call as its UAC logged it (times: wall clock, s)."""

    call_id: str
    uac: str
    kind: str  # ordinary | emergency
    proxy: str
    user: str
    account: str
    number: str
    invite: float = 0.0
    answered: float = 0.0
    ended: float = 0.0
    rejected: float = 0.0
    code: int = 0
    reason: str = ""

    @property
    def dialog_id(self) -> str:
        n, _, rest = self.call_id.partition("-")
        pid = rest.split("@", 1)[0]
        return f"{self.call_id};{pid}SIPpTag00{n}"


class Uac:
    """A SIPp UAC placing calls through one proxy at a steady rate until stopped."""

    def __init__(self, name: str, kind: str, proxy: ProxyProc, local_ip: str,
                 calls: Sequence[tuple[str, str, str]], rate: float, hold_s: float,
                 workdir: Path, max_s: float) -> None:
        self.name = name
        self.kind = kind
        self.proxy = proxy
        self.local_ip = local_ip
        self.calls = list(calls)
        self.rate = rate
        self.hold_s = hold_s
        self.csv = workdir / f"uac-{name}.csv"
        self.logfile = workdir / f"uac-{name}.log"
        self.screen = workdir / f"uac-{name}.screen"
        self.max_s = max_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Uac:
        self.csv.write_text("SEQUENTIAL\n" + "".join(f"{u};{a};{n};\n" for u, a, n in self.calls))
        per_10s = max(1, round(self.rate * 10))
        count = int(self.rate * self.max_s) + 10
        args = [SIPP, self.proxy.address, "-sf", str(SCENARIOS / "chaos_uac.xml"),
                "-inf", str(self.csv), "-i", self.local_ip, "-p", str(free_udp_port()),
                "-mp", str(free_media_ports()), "-m", str(count), "-l", "100000",
                "-r", str(per_10s), "-rp", "10000", "-d", str(int(self.hold_s * 1000)),
                "-trace_logs", "-log_file", str(self.logfile), "-nostdin",
                "-recv_timeout", "15000", "-timeout", f"{int(self.max_s + 120)}s"]
        with self.screen.open("wb") as fh:
            self.process = subprocess.Popen(args, cwd=self.csv.parent, stdout=fh,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return self

    def finish(self) -> None:
        """No new calls from now on (the calls in progress go on to their end)."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGUSR1)  # SIPp: a smooth exit, no new call

    def wait(self, timeout: float) -> bool:
        p = self.process
        if p is None:
            return True
        try:
            p.wait(timeout=max(0.1, timeout))
            return True
        except subprocess.TimeoutExpired:
            stop_group(p, signal.SIGKILL)
            return False

    def kill(self) -> None:
        stop_group(self.process, signal.SIGKILL)

    def parse(self) -> dict[str, CallLog]:
        """Every call it logged, by Call-ID."""
        out: dict[str, CallLog] = {}
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return out

        def call(cid: str) -> CallLog:
            c = out.get(cid)
            if c is None:
                n = int(cid.split("-", 1)[0])
                u, a, num = self.calls[(n - 1) % len(self.calls)]
                c = out[cid] = CallLog(cid, self.name, self.kind, self.proxy.name, u, a, num)
            return c

        def when(s: str, us: str) -> float:
            return float(s) + float(us) / 1e6

        for line in lines:
            parts = line.split()
            try:
                if parts[0] in ("INV", "ANS", "END") and len(parts) >= 4:
                    t = when(parts[2], parts[3])
                    c = call(parts[1])
                    if parts[0] == "INV":
                        c.invite = t
                    elif parts[0] == "ANS":
                        c.answered = t
                    else:
                        c.ended = t
                elif parts[0] == "REJ" and len(parts) >= 5:
                    c = call(parts[2])
                    c.code = int(float(parts[1]))
                    c.rejected = when(parts[3], parts[4])
                    c.reason = " ".join(parts[5:])
            except (ValueError, IndexError):
                continue
        return out


class Uas:
    def __init__(self, ip: str, workdir: Path, max_s: float) -> None:
        self.ip = ip
        self.port = free_udp_port()
        self.screen = workdir / f"uas-{ip}-{self.port}.screen"
        self.max_s = max_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Uas:
        with self.screen.open("wb") as fh:
            self.process = subprocess.Popen(
                [SIPP, "-sf", str(SCENARIOS / "uas.xml"), "-i", self.ip, "-p", str(self.port),
                 "-mp", str(free_media_ports()), "-nostdin", "-timeout", f"{int(self.max_s)}s"],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        time.sleep(0.3)
        if self.process.poll() is not None:
            raise RuntimeError(f"sipp UAS exited: {_tail(self.screen)}")
        return self

    def stop(self) -> None:
        stop_group(self.process, timeout=5)


# ----------------------------------------------------------------------------- sampling

#: the ids of the dialogs Redis counts (every node's index, each record live: early or
#: confirmed) and the count fields given (ARGV[2..]), in Redis's clock, in one script:
#: one instant. KEYS[1] the counts hash, ARGV[1] the namespace's key prefix
SAMPLE_SCRIPT = """
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local ids = {}
for _, node in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'nidx')) do
  for _, did in ipairs(redis.call('ZRANGE', ARGV[1] .. 'n:' .. node, 0, -1)) do
    local raw = redis.call('GET', ARGV[1] .. 'd:' .. did)
    local st = raw and string.match(raw, '^([^|]*)|')
    if st == 'early' or st == 'confirmed' then ids[#ids + 1] = did end
  end
end
local counts = {}
for i = 2, #ARGV do counts[i - 1] = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0 end
return {now, ids, counts}
"""


@dataclass
class Sample:
    t: float  # wall clock of the Redis read (s)
    redis_ok: bool
    ids: frozenset[str]  # what Redis counts (total)
    counts: dict[str, int]  # profile label -> live members
    before: dict[str, frozenset[str] | None]  # each proxy's dialogs just before
    after: dict[str, frozenset[str] | None]  # and just after

    def complete(self) -> bool:
        return self.redis_ok and all(v is not None for v in (*self.before.values(),
                                                             *self.after.values()))

    def up(self) -> frozenset[str]:
        """Calls up for sure at the instant of the Redis read: on a proxy before and
        after it."""
        out: set[str] = set()
        for name, b in self.before.items():
            a = self.after.get(name)
            if b is not None and a is not None:
                out |= b & a
        return frozenset(out)

    def seen(self) -> frozenset[str]:
        """Calls on a proxy before or after the Redis read."""
        out: set[str] = set()
        for v in (*self.before.values(), *self.after.values()):
            if v is not None:
                out |= v
        return frozenset(out)


class Reader:
    """A Redis client for the tool itself, made again after a failure (a restart, a
    failover: ``make`` finds the primary)."""

    def __init__(self, make: Callable[[], redis.Redis]) -> None:
        self.make = make
        self._client: redis.Redis | None = None

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = self.make()
        return self._client

    def call(self, fn: Callable[[redis.Redis], Any]) -> Any:
        try:
            return fn(self.client())
        except (redis.RedisError, OSError):
            self.reset()
            raise

    def reset(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None


class Sampler(threading.Thread):
    def __init__(self, world: World, interval: float) -> None:
        super().__init__(name="chaos-sampler", daemon=True)
        self.world = world
        self.interval = interval
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.reader = world.reader()
        self.lock = threading.Lock()
        self.labels = world.profile_labels()
        keys = Keys(world.namespace)
        self.counts_key = keys.counts
        self.args = [keys.prefix, *(_field(label) for label in self.labels)]

    def proxies(self) -> dict[str, frozenset[str] | None]:
        return {p.name: p.dialog_ids() for p in self.world.proxies}

    def take(self) -> Sample:
        before = self.proxies()
        t = time.time()
        try:
            raw = self.reader.call(lambda c: c.eval(SAMPLE_SCRIPT, 1, self.counts_key,
                                                             *self.args))
            ok = True
            ids = frozenset(_intern(x.decode() if isinstance(x, bytes) else str(x))
                            for x in raw[1])
            counts = {label: int(n) for label, n in zip(self.labels, raw[2], strict=True)}
            t = int(raw[0]) / 1000
        except (redis.RedisError, OSError):
            ok, ids, counts = False, frozenset(), {}
        after = self.proxies()
        return Sample(t, ok, ids, counts, before, after)

    def run(self) -> None:
        nxt = time.monotonic()
        while not self.stop_event.is_set():
            s = self.take()
            with self.lock:
                self.samples.append(s)
            nxt += self.interval
            self.stop_event.wait(max(0.0, nxt - time.monotonic()))

    def since(self, t: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if s.t >= t]

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def _field(label: str) -> str:
    profile, eq, value = label.partition("=")
    return Keys.count_field(profile, value if eq else None)


@dataclass
class CdrRecord:
    record_id: str
    dialog_id: str
    call_id: str
    reason: str
    end_ms: int


class Monitor(threading.Thread):
    """Redis's MONITOR stream into a file (every command, with its time and client),
    across restarts and failovers: what ran in which order, for a ghost's diagnosis."""

    def __init__(self, world: World, path: Path) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.world = world
        self.path = path
        self.stop_event = threading.Event()

    def run(self) -> None:
        with self.path.open("a") as out:
            while not self.stop_event.is_set():
                try:
                    c = _client(self.world.redis_port(), 0.5)
                    with c.monitor() as m:  # type: ignore[no-untyped-call]
                        while not self.stop_event.is_set():
                            try:  # the raw line: "<time> [<db> <client>] <command>"
                                line = m.connection.read_response()
                            except redis.TimeoutError:
                                continue
                            if isinstance(line, bytes):
                                line = line.decode(errors="replace")
                            out.write(f"{line}\n")
                except (redis.RedisError, OSError, ValueError):
                    self.stop_event.wait(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class CdrFollower(threading.Thread):
    """Follows the call-end record stream as ``policer cdr tail -f`` does (XRANGE after
    the last id read, every 0.5 s), across restarts and failovers."""

    def __init__(self, world: World) -> None:
        super().__init__(name="chaos-cdr", daemon=True)
        self.world = world
        self.store: RedisStore | None = None
        self.records: list[CdrRecord] = []
        self.last = ""
        self.stop_event = threading.Event()
        self.errors = 0
        self.lock = threading.Lock()

    def poll(self) -> None:
        with self.lock:
            self._poll()

    def _poll(self) -> None:
        while True:
            try:
                if self.store is None:  # (again after a failure: the primary may have moved)
                    self.store = RedisStore(f"redis://127.0.0.1:{self.world.redis_port()}/0",
                                            self.world.namespace, timeout_ms=1000)
                rows = self.store.call_records(count=5000, after=self.last)
            except (StoreError, redis.RedisError, OSError):
                self.errors += 1
                if self.store is not None:
                    with contextlib.suppress(Exception):
                        self.store.close()
                self.store = None
                return
            for r in rows:
                self.records.append(CdrRecord(r.record_id, r.dialog_id, r.call_id, r.reason,
                                              r.end_ms))
                self.last = r.record_id
            if len(rows) < 5000:
                return

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self.poll()


# ----------------------------------------------------------------------------- the world


@dataclass
class Check:
    """Ghosts and uncounted calls at one instant, from two complete samples 1 s apart."""

    at: float
    t1: float = 0.0
    t2: float = 0.0
    redis_count: int = -1
    live: int = -1
    ghosts: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)  # id -> Redis's dialog hash
    ok: bool = False
    #: the ids counted or up at the second sample (only kept when a few)
    present: list[str] = field(default_factory=list)


@dataclass
class Row:
    spec: FaultSpec
    t_start: float = 0.0
    t_clear: float = 0.0
    t_end: float = 0.0
    note: str = ""
    checks: dict[str, Check] = field(default_factory=dict)
    log_from: dict[str, int] = field(default_factory=dict)
    log_to: dict[str, int] = field(default_factory=dict)


class World:
    """One flavour's processes for a set of faults (a single Redis, or a Sentinel set)."""

    def __init__(self, opts: Options, kind: str, workdir: Path, netns: bool) -> None:
        self.opts = opts
        self.kind = kind
        self.workdir = workdir
        self.want_netns = netns
        self.namespace = f"chaos{os.getpid()}{kind[0]}{time.monotonic_ns() % 10**6}"
        self.limits = opts.limits()
        self.policy_path = workdir / "policy.yaml"
        self.redis: ChaosRedis | None = None
        self.sentinel: SentinelSet | None = None
        self.netns: netfault.NetNs | None = None
        self.firewall: netfault.Firewall | None = None
        self.relay: netfault.Relay | None = None
        self.proxies: list[ProxyProc] = []
        self.uases: list[Uas] = []
        self.uacs: list[Uac] = []
        self.sampler: Sampler | None = None
        self.cdrs: CdrFollower | None = None
        self.monitor: Monitor | None = None
        self.rows: list[Row] = []
        self.t_begin = 0.0
        self.t_traffic = 0.0
        self.t_drained = 0.0
        self.final: Check | None = None
        self.stable_port = 0
        self.repoints: list[tuple[float, int]] = []
        self._follow_stop = threading.Event()
        self._follower: threading.Thread | None = None
        self.max_s = 0.0

    # -- set-up
    def profile_labels(self) -> list[str]:
        return (["total", "international", "local"] + [f"user={u}" for u in USERS]
                + [f"account={a}" for a in ACCOUNTS])

    def redis_port(self) -> int:
        """Where the primary is now."""
        if self.redis is not None:
            return self.redis.port
        assert self.sentinel is not None
        port = self.sentinel.master_port()
        if port is None:
            raise redis.ConnectionError("no primary known to the sentinels")
        return port

    def reader(self, timeout: float = 0.3) -> Reader:
        return Reader(lambda: _client(self.redis_port(), timeout))

    def write_policy(self) -> None:
        self.policy_path.write_text(POLICY.format(
            namespace=self.namespace, emergency=EMERGENCY_NUMBER, fallback=FALLBACK_REASON,
            lease=self.opts.lease_s, **self.limits))

    def start(self, max_s: float) -> None:
        opts = self.opts
        self.max_s = max_s
        self.t_begin = time.time()
        self.write_policy()
        # each part is kept before it is started: close() stops whatever was started
        if self.kind == "single":
            self.redis = ChaosRedis()
            self.redis.start()
            direct_url = f"redis://127.0.0.1:{self.redis.port}/0"
            url_a = url_b = direct_url
        else:
            self.sentinel = SentinelSet()
            self.sentinel.start()
            if opts.flavour == "native":
                # ndb_redis reaches one fixed address: a loopback port DNATed to the
                # primary, moved by this tool when the sentinels name another one
                self.firewall = netfault.Firewall()
                self.stable_port = free_port()
                self.firewall.stable_address(self.stable_port, self.redis_port())
                url_a = url_b = f"redis://127.0.0.1:{self.stable_port}/0"
                self._follower = threading.Thread(target=self._follow_primary, daemon=True)
                self._follower.start()
            else:
                url_a = url_b = self.sentinel.url()
        if self.want_netns:
            assert self.redis is not None
            self.netns = netfault.NetNs()
            self.netns.create()
            if self.firewall is None:
                self.firewall = netfault.Firewall()
            self.firewall.attach(self.netns.host_link)
            self.relay = netfault.Relay((self.netns.host_ip, free_port()),
                                        ("127.0.0.1", self.redis.port), self.workdir)
            self.relay.start()
            url_b = f"redis://{self.netns.host_ip}:{self.relay.listen[1]}/0"
        uas_a = Uas("127.0.0.1", self.workdir, max_s + 300)
        self.uases.append(uas_a)
        uas_a.start()
        if self.netns is not None:
            uas_b = Uas(self.netns.host_ip, self.workdir, max_s + 300)
            self.uases.append(uas_b)
            uas_b.start()
        else:
            uas_b = uas_a
        self.proxies = [self._proxy("a", "127.0.0.1", uas_a, url_a, None),
                        self._proxy("b", self.netns.ns_ip if self.netns else "127.0.0.1",
                                    uas_b, url_b, self.netns)]
        for p in self.proxies:
            p.start()
        log(opts, f"{opts.flavour}/{self.kind}: proxies "
                  + ", ".join(f"{p.node} on {p.address} -> {p.redis_url}" for p in self.proxies))
        nodes_key = Keys(self.namespace).prefix + "nodes"
        reader = self.reader(1.0)

        def leased() -> bool:
            try:
                return int(reader.call(lambda c: c.zcard(nodes_key))) >= len(self.proxies)
            except (redis.RedisError, OSError):
                return False

        _wait("both nodes' leases", leased, 20, 0.2)
        if opts.monitor:
            self.monitor = Monitor(self, self.workdir / "monitor.log")
            self.monitor.start()
        self.sampler = Sampler(self, opts.sample_s)
        self.sampler.start()
        self.cdrs = CdrFollower(self)
        self.cdrs.start()
        rng = random.Random(15)
        ordinary: list[tuple[str, str, str]] = []
        for _ in range(240):
            user = USERS[rng.randrange(len(USERS))]
            account = ACCOUNTS[USERS.index(user) % len(ACCOUNTS)]
            number = INTERNATIONAL_NUMBER if rng.random() < 0.2 else LOCAL_NUMBER
            ordinary.append((user, account, number))
        for p in self.proxies:
            local_ip = self.netns.host_ip if p.netns and self.netns else "127.0.0.1"
            self.uacs.append(Uac(f"{self.kind}-{p.name}-ordinary", "ordinary", p, local_ip,
                                 ordinary, opts.rate, opts.hold_s, self.workdir, max_s))
            self.uacs.append(Uac(f"{self.kind}-{p.name}-emergency", "emergency", p, local_ip,
                                 [(f"sos-{p.name}", EMERGENCY_ACCOUNT, EMERGENCY_NUMBER)],
                                 opts.emergency_rate, opts.emergency_hold_s, self.workdir,
                                 max_s))
        for u in self.uacs:
            u.start()
        self.t_traffic = time.time()

    def _proxy(self, name: str, ip: str, uas: Uas, url: str,
               netns: netfault.NetNs | None) -> ProxyProc:
        port = free_udp_port()
        runtime = Path(tempfile.mkdtemp(prefix="pkc-"))  # short: unix socket paths
        node = f"chaos-{name}"
        env = proxy_env(policy=self.policy_path, redis_url=url, port=port,
                        upstream_port=uas.port, flavour=self.opts.flavour, node=node,
                        runtime=runtime, children=self.opts.children, shm_mb=64,
                        extra={"POLICER_SIP_LISTEN": f"udp:{ip}:{port}",
                               "POLICER_SIP_UPSTREAM": f"sip:{uas.ip}:{uas.port}",
                               "PYTHONPATH": str(ROOT)})
        return ProxyProc(name, node, self.opts.flavour, ip, port, f"sip:{uas.ip}:{uas.port}",
                         url, runtime, self.workdir / f"kamailio-{self.kind}-{name}.log", env,
                         netns)

    def _follow_primary(self) -> None:
        """Native flavour, Sentinel world: keep the stable address on the primary."""
        assert self.sentinel is not None and self.firewall is not None
        while not self._follow_stop.wait(0.1):
            port = self.sentinel.master_port()
            if port is not None and port != self.firewall.target_port:
                self.firewall.repoint(port)
                self.repoints.append((time.time(), port))

    # -- the end
    def drain(self) -> None:
        """Stop placing calls; wait for every call to end."""
        for u in self.uacs:
            u.finish()
        limit = max(self.opts.hold_s, self.opts.emergency_hold_s) + 25
        deadline = time.monotonic() + limit
        for u in self.uacs:
            u.wait(deadline - time.monotonic())
        self.t_drained = time.time()

    def close(self) -> None:
        """Stop everything this world started; one step failing does not stop the rest."""
        self._follow_stop.set()
        steps: list[Callable[[], object]] = [u.kill for u in self.uacs]
        if self._follower is not None:
            steps.append(partial(self._follower.join, timeout=5))
        for thread in (self.sampler, self.monitor):
            if thread is not None:
                steps.append(thread.stop)
        if self.cdrs is not None:
            steps.append(self.cdrs.stop_event.set)
        steps += [p.stop for p in self.proxies]
        steps += [s.stop for s in self.uases]
        for part in (self.relay, self.firewall, self.netns):
            if part is not None:
                steps.append(part.stop if isinstance(part, netfault.Relay) else part.destroy)
        for server in (self.redis, self.sentinel):
            if server is not None:
                steps.append(server.stop)
        steps += [partial(shutil.rmtree, p.runtime, ignore_errors=True) for p in self.proxies]
        for step in steps:
            try:
                step()
            except Exception as e:
                log(self.opts, f"clean-up step failed: {e!r}")

    # -- checks
    def check(self, at: float, timeout: float = 6) -> Check:
        """Ghosts and uncounted calls at ``at``: ids Redis counts that no proxy carries
        (and the reverse) in both of two complete samples 1 s apart; Redis's hash of
        each, read now."""
        assert self.sampler is not None
        c = Check(at)
        deadline = time.time() + timeout
        s1 = s2 = None
        while time.time() < deadline:
            done = [s for s in self.sampler.since(at) if s.complete()]
            s1 = done[0] if done else None
            s2 = next((s for s in done if s1 is not None and s.t >= s1.t + 1.0), None)
            if s1 is not None and s2 is not None:
                break
            time.sleep(0.1)
        if s1 is None or s2 is None:
            c.detail["error"] = "no two complete samples (Redis or a proxy did not answer)"
            return c
        c.t1, c.t2, c.ok = s1.t, s2.t, True
        c.redis_count = len(s2.ids)
        c.live = len(s2.up())
        c.ghosts = sorted((s1.ids & s2.ids) - s1.seen() - s2.seen())
        c.lost = sorted((s1.up() & s2.up()) - s1.ids - s2.ids)
        present = s2.ids | s2.up()
        if len(present) <= 20:
            c.present = sorted(present)
        if c.ghosts or c.lost:
            c.detail = self.dialog_records([*c.ghosts, *c.lost][:50])
        return c

    def dialog_records(self, ids: Iterable[str]) -> dict[str, Any]:
        keys = Keys(self.namespace)
        reader = self.reader(1.0)
        out: dict[str, Any] = {}
        for did in ids:
            key = keys.dialog(did)

            def read(c: redis.Redis, key: str = key) -> Any:
                return c.execute_command("GET", key, NEVER_DECODE=True)

            try:
                raw = reader.call(read)
            except (redis.RedisError, OSError) as e:
                out[did] = {"error": str(e)}
                continue
            rec = unpack_record(raw) if raw else None
            out[did] = {k: v.decode(errors="replace") for k, v in (rec or {}).items()
                        if k != "tail"}
        return out

    def sleep_until(self, t: float) -> None:
        while True:
            left = t - time.time()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))


# ----------------------------------------------------------------------------- injecting


def inject(world: World, row: Row) -> None:
    """Start the row's fault, wait its length, end it: sets t_start and t_clear (when
    Redis answered again, or the fault was lifted)."""
    name = row.spec.name
    row.t_start = time.time()
    r = world.redis
    if name == "none":
        row.t_clear = row.t_start
    elif name.startswith("pause-"):
        assert r is not None
        length = float(name.split("-", 1)[1])
        r.signal(signal.SIGSTOP)
        try:
            time.sleep(length)
        finally:
            r.signal(signal.SIGCONT)
        row.t_clear = time.time()
    elif name == "spikes":
        assert r is not None
        c = _client(r.port, 5)
        slept = 0
        for i in range(20):
            world.sleep_until(row.t_start + i * 0.5)
            c.execute_command("DEBUG", "SLEEP", "0.08")
            slept += 1
        row.t_clear = time.time()
        row.note = f"{slept} DEBUG SLEEP 0.08"
    elif name in ("restart-empty", "restart-aof"):
        assert r is not None
        r.kill()
        if name == "restart-empty":
            r.wipe()
        r.start(timeout=30)
        row.t_clear = time.time()
        row.note = f"Redis answered {row.t_clear - row.t_start:.2f} s after the kill"
    elif name == "client-kill":
        assert r is not None
        killed = _client(r.port, 2).execute_command("CLIENT", "KILL", "TYPE", "normal")
        row.t_clear = time.time()
        row.note = f"{killed} connections killed"
    elif name in ("partition", "loss-30"):
        assert world.firewall is not None and world.relay is not None
        world.firewall.drop(world.relay.listen[1], None if name == "partition" else 0.3)
        try:
            time.sleep(8 if name == "partition" else 5)
        finally:
            world.firewall.heal()
        row.t_clear = time.time()
    elif name.startswith("latency-"):
        assert world.relay is not None
        world.relay.set_delay(int(name.split("-", 1)[1]))
        try:
            time.sleep(5)
        finally:
            world.relay.set_delay(0)
        row.t_clear = time.time()
    elif name == "proxy-kill":
        p = world.proxies[0]
        p.kill9()
        time.sleep(2)
        t_restart = time.time()
        row.t_clear = p.start()
        row.note = f"{p.node} ready {row.t_clear - t_restart:.2f} s after its restart"
    elif name == "failover":
        assert world.sentinel is not None
        old = world.redis_port()
        server = world.sentinel.server(old)
        assert server is not None
        server.kill()
        t_kill = time.time()
        sentinel = world.sentinel
        _wait("the sentinels to promote the replica",
              lambda: (sentinel.master_port() or old) != old, 30, 0.05)
        new = world.redis_port()
        fw = world.firewall
        if fw is not None:  # native: the stable address must follow
            _wait("the stable address to follow", lambda: fw.target_port == new, 5, 0.02)
        _wait("the new primary", lambda: _ping(new), 10, 0.02)
        row.t_clear = time.time()
        row.note = (f"primary {old} killed; {new} promoted and answering "
                    f"{row.t_clear - t_kill:.2f} s later")
    else:
        raise ValueError(f"unknown fault {name}")


def _ping(port: int) -> bool:
    try:
        return bool(_client(port, 0.3).ping())
    except redis.RedisError:
        return False


def run_rows(world: World, names: Sequence[str]) -> None:
    opts = world.opts
    for name in names:
        row = Row(FAULTS[name])
        world.rows.append(row)
        row.log_from = {p.name: p.log_size() for p in world.proxies}
        log(opts, f"{opts.flavour}: fault {name}: {row.spec.title} ({row.spec.length})")
        # every call-end record written so far is read first: a record the fault loses
        # is then one the store lost, not one this follower had not read yet
        assert world.cdrs is not None
        world.cdrs.poll()
        inject(world, row)
        row.t_end = row.t_clear + opts.recovery_s
        for label, offset in (("+1s", 1.0), ("+5s", 5.0)):
            world.sleep_until(row.t_clear + offset + 1.3)
            row.checks[label] = world.check(row.t_clear + offset)
        world.sleep_until(row.t_end)
        row.checks["end"] = world.check(row.t_end - 1.2)
        row.log_to = {p.name: p.log_size() for p in world.proxies}
        c = row.checks["end"]
        log(opts, f"{opts.flavour}: {name} done: ghosts +1s/+5s/end "
                  f"{'/'.join(str(len(x.ghosts)) for x in row.checks.values())}, "
                  f"uncounted {'/'.join(str(len(x.lost)) for x in row.checks.values())}; "
                  f"Redis counts {c.redis_count}, live {c.live}")


# ----------------------------------------------------------------------------- analysis


@dataclass
class RowResult:
    fault: str
    title: str
    length: str
    world: str
    note: str
    t_start: float
    t_clear: float
    t_end: float
    #: calls whose INVITE was sent between the fault's start and the row's end
    invites: int = 0
    answered: int = 0
    rejected_by_limit: int = 0
    rejected_by_fallback: int = 0
    rejected_other: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    samples: int = 0
    samples_redis_answered: int = 0
    #: samples (Redis answered) with more ordinary calls up (on the proxies) than a max
    over_live: int = 0
    over_live_worst: str = ""
    #: samples with Redis counting more ordinary calls than a max
    over_redis: int = 0
    over_redis_worst: str = ""
    emergency_placed: int = 0
    emergency_admitted: int = 0
    emergency_rejected: int = 0
    emergency_unanswered: int = 0
    emergency_up_after: int = 0
    emergency_counted_after: int = 0
    ghosts: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)
    count_equals_live_after_s: float | None = None
    target_s: float = 0.0
    mismatch_max: int = 0
    calls_ended: int = 0
    cdr_lost: int = 0
    cdr_lost_ids: list[str] = field(default_factory=list)
    cdr_duplicated: int = 0
    failed_after_admission: int = 0
    log_events: dict[str, dict[str, int]] = field(default_factory=dict)
    log_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)
    cdr_reasons: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    clean: bool = True
    problems: list[str] = field(default_factory=list)


@dataclass
class FlavourResult:
    flavour: str
    rate_per_proxy: float
    hold_s: float
    emergency_rate_per_proxy: float
    emergency_hold_s: float
    proxies: int
    limits: dict[str, int]
    rows: list[RowResult]
    final: dict[str, Any]
    totals: dict[str, Any]
    started: str
    seconds: float
    workdir: str
    clean: bool = True
    errors: list[str] = field(default_factory=list)


#: a call's release is applied this long after its end at the latest in steady state (the
#: proxies send dialog events in batches every 100 ms)
RELEASE_LAG = 0.25

LOG_MARKERS = {
    "store_error": re.compile(r"store_error"),
    "circuit_open": re.compile(r"circuit_open"),
    "store_state_lost": re.compile(r"store_state_lost\b"),
    "store_server_changed": re.compile(r"store_server_changed"),
    "resynced": re.compile(r"\bresynced\b"),
    "lease_lapsed": re.compile(r"lease_lapsed"),
    "library_loaded": re.compile(r"policy_library_loaded"),
    "lost_node_dialogs_ended": re.compile(r"lost_node_dialogs_ended"),
    "batch_not_applied": re.compile(r"batch of .* was not applied|not applied; kept"),
    # ndb_redis (native): a timed-out command disables the server in that process for
    # disable_time (the cfg's allowed_timeouts 0: at the first timeout)
    "ndb_disabled": re.compile(r"REDIS server \S+ disabled for"),
    "late": re.compile(r"POLICER late"),
    "recovering": re.compile(r"POLICER recovering"),
}


def _log_events(path: Path, start: int, end: int) -> tuple[dict[str, int], list[str]]:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read(max(0, end - start)).decode(errors="replace")
    except OSError:
        return {}, []
    counts = {k: len(rx.findall(text)) for k, rx in LOG_MARKERS.items()}
    notable = [line.strip()[:400] for line in text.splitlines()
               if re.search(r"resynced|store_state_lost|store_server_changed|lease_lapsed|"
                            r"lost_node_dialogs|resync_failed|not_restored|tick_failed|"
                            r"Traceback|CRITICAL", line)]
    return {k: v for k, v in counts.items() if v}, notable[:20]


def _labels_of(c: CallLog) -> list[str]:
    klass = "international" if c.number.startswith("00") else "local"
    return ["total", klass, f"user={c.user}", f"account={c.account}"]


def _max_of(limits: dict[str, int], label: str) -> int | None:
    profile = label.partition("=")[0]
    return limits.get(profile)


def _over(counts: Counter[str], limits: dict[str, int]) -> list[tuple[str, int, int]]:
    out = []
    for label, n in counts.items():
        mx = _max_of(limits, label)
        if mx is not None and n > mx:
            out.append((label, n, mx))
    return out


def analyse(world: World, calls: dict[str, CallLog], cdrs: list[CdrRecord]) -> list[RowResult]:
    assert world.sampler is not None
    samples = list(world.sampler.samples)
    by_did = {c.dialog_id: c for c in calls.values()}
    emergency_ids = {did for did, c in by_did.items() if c.kind == "emergency"}
    cdr_by_call: Counter[str] = Counter(r.call_id for r in cdrs)
    reasons_by_call: dict[str, list[str]] = {}
    for rec in cdrs:
        reasons_by_call.setdefault(rec.call_id, []).append(rec.reason)
    results = []
    row_bounds = [r.t_start for r in world.rows[1:]] + [float("inf")]
    for i, row in enumerate(world.rows):
        res = RowResult(row.spec.name, row.spec.title, row.spec.length, world.kind, row.note,
                        row.t_start, row.t_clear, row.t_end, target_s=row.spec.target_s)
        window = [s for s in samples if row.t_start <= s.t <= row.t_end]
        # -- traffic
        for c in calls.values():
            if c.kind != "ordinary" or not row.t_start <= c.invite <= row.t_end:
                continue
            res.invites += 1
            if c.answered:
                res.answered += 1
            elif c.rejected:
                if c.reason in LIMIT_REASONS:
                    res.rejected_by_limit += 1
                elif c.reason == FALLBACK_REASON:
                    res.rejected_by_fallback += 1
                else:
                    key = f"{c.code} {c.reason}"
                    res.rejected_other[key] = res.rejected_other.get(key, 0) + 1
            else:
                res.unanswered += 1
        # -- over-admissions
        res.samples = len(window)
        worst_live: tuple[int, str] = (0, "")
        worst_redis: tuple[int, str] = (0, "")
        evidence: dict[str, Any] = {}
        for s in window:
            if not s.redis_ok:
                continue
            res.samples_redis_answered += 1
            live: Counter[str] = Counter()
            for did in s.up():
                up = by_did.get(did)
                if up is not None and up.kind == "ordinary":
                    live.update(_labels_of(up))
            over = _over(live, world.limits)
            if over:
                res.over_live += 1
                for label, n, mx in over:
                    if n - mx > worst_live[0]:
                        worst_live = (n - mx, f"{label} {n}/{mx} at +{s.t - row.t_start:.1f}s")
                if not evidence:
                    evidence = _over_evidence(s, over[0][0], by_did, row, cdrs)
            counted = Counter(s.counts)
            counted["total"] -= len(s.ids & emergency_ids)
            over = _over(counted, world.limits)
            if over:
                res.over_redis += 1
                for label, n, mx in over:
                    if n - mx > worst_redis[0]:
                        worst_redis = (n - mx, f"{label} {n}/{mx} at +{s.t - row.t_start:.1f}s")
        res.over_live_worst, res.over_redis_worst = worst_live[1], worst_redis[1]
        if evidence:
            res.diagnostics["over_admission"] = evidence
        # -- emergency calls placed during the fault and the recovery hold after it
        placed = [c for c in calls.values() if c.kind == "emergency"
                  and row.t_start <= c.invite <= max(row.t_clear, row.t_start) + 3.0]
        res.emergency_placed = len(placed)
        res.emergency_admitted = sum(1 for c in placed if c.answered)
        res.emergency_rejected = sum(1 for c in placed if c.rejected and not c.answered)
        res.emergency_unanswered = sum(1 for c in placed if not c.answered and not c.rejected)
        after = [s for s in samples if s.t >= row.t_clear + 5.0 and s.complete()]
        if after:
            s = after[0]
            still = {c.dialog_id for c in placed if c.answered} & s.up()
            res.emergency_up_after = len(still)
            res.emergency_counted_after = len(still & s.ids)
        # -- ghosts and uncounted calls
        for label, chk in row.checks.items():
            res.ghosts[label] = len(chk.ghosts) if chk.ok else -1
            res.uncounted[label] = len(chk.lost) if chk.ok else -1
        # -- when the count became the live calls
        res.count_equals_live_after_s, res.mismatch_max = _converged(
            [s for s in samples if row.t_clear <= s.t <= row.t_end], row.t_clear)
        # -- call-end records of calls that ended during this row: a call's release
        # reaches Redis up to a batch interval (100 ms) after its end, so it belongs to
        # the row it is applied in (RELEASE_LAG after the end)
        hi = row_bounds[i]
        ended = [c for c in calls.values()
                 if c.ended and row.t_start <= c.ended + RELEASE_LAG < hi]
        failed = [c for c in calls.values() if c.rejected and not c.answered
                  and row.t_start <= c.rejected + RELEASE_LAG < hi
                  and c.reason not in LIMIT_REASONS
                  and c.reason not in (FALLBACK_REASON, ENDED_REASON)]
        res.calls_ended = len(ended)
        res.failed_after_admission = len(failed)
        missing = [c.call_id for c in (*ended, *failed) if cdr_by_call[c.call_id] == 0]
        res.cdr_lost = len(missing)
        res.cdr_lost_ids = missing[:20]
        res.cdr_duplicated = sum(1 for c in ended if cdr_by_call[c.call_id] > 1)
        reasons: Counter[str] = Counter()
        for c in ended:
            reasons.update(reasons_by_call.get(c.call_id, []))
        res.cdr_reasons = dict(reasons)
        # -- the proxies' logs during the row
        notable: dict[str, list[str]] = {}
        for p in world.proxies:
            counts, lines = _log_events(p.log, row.log_from.get(p.name, 0),
                                        row.log_to.get(p.name, 0))
            res.log_events[p.node] = counts
            res.log_bytes[p.node] = (row.log_from.get(p.name, 0), row.log_to.get(p.name, 0))
            if lines:
                notable[p.node] = lines
        _verdict(res, row, by_did, calls, cdrs, notable, world)
        results.append(res)
    return results


def _over_evidence(s: Sample, label: str, by_did: dict[str, CallLog], row: Row,
                   cdrs: list[CdrRecord]) -> dict[str, Any]:
    """The first sample with a profile over its max: every ordinary call of that profile
    up then, when it was placed, answered and ended (s after the fault's start), which
    proxy carried it, whether Redis counted it then, and its call-end records."""
    rel = row.t_start
    calls = []
    for did in sorted(s.up()):
        c = by_did.get(did)
        if c is None or c.kind != "ordinary" or label not in _labels_of(c):
            continue
        calls.append({
            "call_id": c.call_id, "proxy": c.proxy, "counted_by_redis": did in s.ids,
            "invite": round(c.invite - rel, 3),
            "answered": round(c.answered - rel, 3) if c.answered else None,
            "ended": round(c.ended - rel, 3) if c.ended else None,
            "records": [(r.reason, round(r.end_ms / 1000 - rel, 3)) for r in cdrs
                        if r.call_id == c.call_id]})
    return {"profile": label, "at": round(s.t - rel, 3), "redis_count": s.counts.get(label),
            "calls": calls}


def _converged(window: list[Sample], t_clear: float, lookahead: float = 0.6
               ) -> tuple[float | None, int]:
    """When the count became the live calls after ``t_clear``, and stayed so: the first
    complete sample from which on every complete sample has no id Redis counts that no
    proxy carries, nor the reverse, that is still so ``lookahead`` s later (what is in
    flight, a release on its way, is not a mismatch). None: never within the window."""
    done = [s for s in window if s.complete()]
    mismatches: list[tuple[float, int]] = []
    for k, s in enumerate(done):
        later = next((x for x in done[k + 1:] if x.t >= s.t + lookahead), None)
        if later is None:
            break
        ghosts = (s.ids - s.seen()) & (later.ids - later.seen())
        lost = (s.up() - s.ids) & (later.up() - later.ids)
        mismatches.append((s.t, len(ghosts) + len(lost)))
    if not mismatches:
        return None, 0
    worst = max(n for _, n in mismatches)
    if mismatches[-1][1]:
        return None, worst
    first = len(mismatches)
    while first > 0 and mismatches[first - 1][1] == 0:
        first -= 1
    if first == 0:  # equal from the first sample on
        return 0.0, worst
    return round(max(0.0, mismatches[first][0] - t_clear), 2), worst


def _verdict(res: RowResult, row: Row, by_did: dict[str, CallLog], calls: dict[str, CallLog],
             cdrs: list[CdrRecord], notable: dict[str, list[str]], world: World) -> None:
    p = res.problems
    if res.over_live:
        p.append(f"over-admission: {res.over_live} samples with more ordinary calls up than "
                 f"a max while Redis answered (worst {res.over_live_worst})")
    if res.over_redis:
        p.append(f"Redis counted more ordinary calls than a max in {res.over_redis} samples "
                 f"(worst {res.over_redis_worst})")
    if res.emergency_admitted < res.emergency_placed:
        p.append(f"emergency calls not admitted: {res.emergency_placed - res.emergency_admitted}"
                 f" of {res.emergency_placed} ({res.emergency_rejected} rejected, "
                 f"{res.emergency_unanswered} unanswered)")
    if res.emergency_counted_after < res.emergency_up_after:
        p.append(f"emergency calls up but not counted 5 s after: "
                 f"{res.emergency_up_after - res.emergency_counted_after}")
    for label in ("+1s", "+5s", "end"):
        g, u = res.ghosts.get(label, -1), res.uncounted.get(label, -1)
        if label == "end" and (g != 0 or u != 0):
            p.append(f"at the row's end: {g} ghosts, {u} calls up but not counted")
    if res.count_equals_live_after_s is None:
        p.append("the count never equalled the live calls within the row")
    elif res.count_equals_live_after_s > res.target_s:
        p.append(f"count = live calls only {res.count_equals_live_after_s:.2f} s after Redis "
                 f"answered again (bound {res.target_s:.0f} s)")
    if res.cdr_lost:
        p.append(f"{res.cdr_lost} call-end records missing")
    res.clean = not p
    if res.cdr_duplicated:
        res.notes.append(f"{res.cdr_duplicated} calls have two call-end records")
    odd_reasons = {k: v for k, v in res.cdr_reasons.items() if k != "bye"}
    if odd_reasons:
        res.notes.append(f"calls ended by BYE recorded with other reasons: {odd_reasons}")
    for node, ev in res.log_events.items():
        if ev.get("circuit_open") or ev.get("ndb_disabled"):
            res.notes.append(f"{node}: breaker opened {ev.get('circuit_open', 0)} times, "
                             f"ndb_redis disabled the server {ev.get('ndb_disabled', 0)} times")
    # -- diagnostics: what Redis, the UAC and the proxies say about each odd id
    odd: dict[str, dict[str, Any]] = {}
    for label, chk in row.checks.items():
        for kind, ids in (("ghost", chk.ghosts), ("uncounted", chk.lost)):
            for did in ids[:10]:
                d = odd.setdefault(did, {"seen_as": []})
                d["seen_as"].append(f"{kind} {label}")
                if did in chk.detail:
                    d.setdefault("redis", {})[label] = chk.detail[did]
    for did, d in list(odd.items())[:20]:
        c = by_did.get(did)
        if c is not None:
            d["call"] = {k: (round(v - row.t_start, 3) if isinstance(v, float) and v else v)
                         for k, v in asdict(c).items()}
        cid = did.split(";", 1)[0]
        d["cdrs"] = [asdict(r) for r in cdrs if r.call_id == cid]
        d["proxy_log"] = _grep_logs(world.proxies, cid)
    if odd:
        res.diagnostics["ids"] = odd
    if res.cdr_lost_ids:
        lost = {}
        for cid in res.cdr_lost_ids[:10]:
            c = calls.get(cid)
            lost[cid] = {"call": {k: (round(v - row.t_start, 3) if isinstance(v, float) and v
                                      else v) for k, v in asdict(c).items()} if c else None,
                         "proxy_log": _grep_logs(world.proxies, cid)}
        res.diagnostics["cdr_lost"] = lost
    if notable:
        res.diagnostics["proxy_log"] = notable


def _grep_logs(proxies: Sequence[ProxyProc], needle: str, limit: int = 8) -> list[str]:
    out: list[str] = []
    for p in proxies:
        try:
            text = p.log.read_text(errors="replace")
        except OSError:
            continue
        out += [f"{p.node}: {line.strip()[:300]}" for line in text.splitlines()
                if needle in line][:limit]
    return out


# ----------------------------------------------------------------------------- running


def _plan_seconds(opts: Options, names: Sequence[str]) -> float:
    length = {"pause-0.2": 0.2, "pause-1": 1, "pause-5": 5, "spikes": 10, "partition": 8,
              "latency-20": 5, "latency-200": 5, "loss-30": 5, "proxy-kill": 4,
              "failover": 5, "restart-empty": 1, "restart-aof": 1}
    return opts.warmup_s + sum(length.get(n, 0.5) + opts.recovery_s + 2 for n in names) + 60


def run_world(opts: Options, kind: str, names: list[str], workdir: Path
              ) -> tuple[World, list[RowResult], dict[str, Any], list[str]]:
    netns = any(FAULTS[n].netns for n in names)
    world = World(opts, kind, workdir, netns)
    errors: list[str] = []
    rows: list[RowResult] = []
    final: dict[str, Any] = {}
    try:
        world.start(_plan_seconds(opts, names))
        log(opts, f"{opts.flavour}/{kind}: traffic on, warming up {opts.warmup_s:.0f} s "
                  f"(limits {world.limits})")
        time.sleep(opts.warmup_s)
        run_rows(world, names)
        log(opts, f"{opts.flavour}/{kind}: no new calls; waiting for the calls up to end")
        world.drain()
        time.sleep(2)
        world.final = world.check(time.time())
        assert world.sampler is not None and world.cdrs is not None
        world.sampler.stop()
        world.cdrs.stop()
        calls: dict[str, CallLog] = {}
        for u in world.uacs:
            calls.update(u.parse())
        rows = analyse(world, calls, world.cdrs.records)
        with (workdir / "cdrs.jsonl").open("w") as fh:  # for a post-mortem
            for rec in world.cdrs.records:
                fh.write(json.dumps(asdict(rec)) + "\n")
        f = world.final
        ended = [c for c in calls.values() if c.ended]
        cdr_calls = {r.call_id for r in world.cdrs.records}
        in_stream = _stream_length(world)
        final = {
            "ghosts": len(f.ghosts), "uncounted": len(f.lost), "redis_count": f.redis_count,
            "live": f.live, "ghost_ids": f.ghosts[:20], "uncounted_ids": f.lost[:20],
            "detail": f.detail, "check_ok": f.ok,
            "calls": len([c for c in calls.values() if c.kind == "ordinary"]),
            "emergency_calls": len([c for c in calls.values() if c.kind == "emergency"]),
            "emergency_not_admitted": sorted(c.call_id for c in calls.values()
                                             if c.kind == "emergency" and not c.answered)[:20],
            "ended_calls": len(ended),
            "cdr_records_followed": len(world.cdrs.records),
            "cdr_records_in_stream_at_end": in_stream,
            "cdr_missing_overall": len([c for c in ended if c.call_id not in cdr_calls]),
            # calls still up (or counted) once every UAC was done: their SIP history
            "still_up": {did: _call_summary(calls, did) for did in f.present},
            "sample_errors": sum(1 for s in world.sampler.samples if not s.redis_ok),
            "samples": len(world.sampler.samples),
            "repoints": world.repoints,
        }
    except Exception as e:
        errors.append(f"{kind}: {type(e).__name__}: {e}")
        log(opts, f"{opts.flavour}/{kind}: ERROR {e}")
        for p in world.proxies:
            log(opts, f"--- {p.node} log tail:\n{_tail(p.log, 25)}")
    finally:
        world.close()
    return world, rows, final, errors


def _call_summary(calls: dict[str, CallLog], did: str) -> dict[str, Any] | None:
    c = calls.get(did.split(";", 1)[0])
    return None if c is None else asdict(c)


def _stream_length(world: World) -> int:
    try:
        return int(world.reader(1.0).call(lambda c: c.xlen(Keys(world.namespace).cdr)))
    except (redis.RedisError, OSError):
        return -1


def run_flavour(opts: Options) -> FlavourResult:
    """Run the selected faults against one flavour; everything started is stopped."""
    missing = missing_tools(opts)
    if missing:
        raise RuntimeError("missing: " + ", ".join(missing))
    netfault.cleanup_leftovers()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.time()
    own_dir = opts.workdir is None
    base = Path(tempfile.mkdtemp(prefix=f"chaos-{opts.flavour}-")) if own_dir \
        else Path(opts.workdir or ".")
    base.mkdir(parents=True, exist_ok=True)
    rows: list[RowResult] = []
    finals: dict[str, Any] = {}
    errors: list[str] = []
    limits: dict[str, int] = {}
    for kind in ("single", "sentinel"):
        names = [n for n in opts.faults if FAULTS[n].world == kind]
        if not names:
            continue
        wd = base / kind
        wd.mkdir(exist_ok=True)
        world, r, final, errs = run_world(opts, kind, names, wd)
        limits = world.limits
        rows += r
        finals[kind] = final
        errors += errs
    totals = {
        "rows": len(rows), "clean_rows": sum(1 for r in rows if r.clean),
        "over_live_samples": sum(r.over_live for r in rows),
        "over_redis_samples": sum(r.over_redis for r in rows),
        "emergency_placed": sum(r.emergency_placed for r in rows),
        "emergency_admitted": sum(r.emergency_admitted for r in rows),
        "ghosts_at_end_of_rows": sum(max(0, r.ghosts.get("end", 0)) for r in rows),
        "cdr_lost": sum(r.cdr_lost for r in rows),
    }
    final_clean = all(f.get("ghosts", 1) == 0 and f.get("uncounted", 1) == 0
                      and not f.get("emergency_not_admitted") for f in finals.values())
    result = FlavourResult(
        opts.flavour, opts.rate, opts.hold_s, opts.emergency_rate, opts.emergency_hold_s, 2,
        limits, rows, finals, totals, started, round(time.time() - t0, 1), str(base),
        clean=not errors and final_clean and all(r.clean for r in rows), errors=errors)
    if own_dir and not opts.keep and result.clean:
        shutil.rmtree(base, ignore_errors=True)
        result.workdir = ""
    return result


def missing_tools(opts: Options) -> list[str]:
    missing = [name for name, path in (("kamailio", KAMAILIO), ("kamcmd", KAMCMD),
                                       ("sipp", SIPP)) if not os.access(path, os.X_OK)]
    if find_redis_server() is None:
        missing.append("redis-server")
    if any(FAULTS[n].netns for n in opts.faults) or (
            opts.flavour == "native" and "failover" in opts.faults):
        missing += netfault.available()
    return missing


# ----------------------------------------------------------------------------- report


def _fmt_pair(d: dict[str, int]) -> str:
    return "/".join("?" if d.get(k, -1) < 0 else str(d.get(k)) for k in ("+1s", "+5s", "end"))


def table(result: FlavourResult) -> str:
    """The fault matrix of one flavour, as a Markdown table."""
    head = ("| fault | INVITEs: answered / limit / fallback / other | "
            "over max while Redis answered: live / Redis | emergency: placed / admitted / "
            "counted after | ghosts +1 s / +5 s / end | uncounted +1 s / +5 s / end | "
            "count = live after (bound) | records lost | clean |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.rows:
        other = sum(r.rejected_other.values()) + r.unanswered
        conv = ("never" if r.count_equals_live_after_s is None
                else f"{r.count_equals_live_after_s:.2f} s")
        counted = (f"{r.emergency_counted_after}/{r.emergency_up_after}"
                   if r.emergency_up_after else "-")
        lines.append(
            f"| {LABELS.get(r.fault, r.fault)} | {r.invites}: {r.answered} / "
            f"{r.rejected_by_limit} / "
            f"{r.rejected_by_fallback} / {other} | {r.over_live} / {r.over_redis} | "
            f"{r.emergency_placed} / {r.emergency_admitted} / {counted} | {_fmt_pair(r.ghosts)} "
            f"| {_fmt_pair(r.uncounted)} | {conv} ({r.target_s:.0f} s) | {r.cdr_lost} | "
            f"{'yes' if r.clean else '**no**'} |")
    return "\n".join(lines)


def report(result: FlavourResult) -> str:
    out = [f"## {result.flavour}: {result.proxies} proxies, {result.rate_per_proxy:g} calls/s "
           f"each held {result.hold_s:g} s, emergency {result.emergency_rate_per_proxy:g}/s each "
           f"held {result.emergency_hold_s:g} s; limits {result.limits}; "
           f"{result.seconds:.0f} s, {result.started}", "", table(result), ""]
    for kind, f in result.final.items():
        for did, call in (f.get("still_up") or {}).items():
            state = ("no call of the UACs" if call is None else
                     f"INVITE at {call['invite']:.3f}, answered {call['answered'] or '-'}, "
                     f"ended {call['ended'] or '-'}, final answer {call['code'] or '-'}")
            out.append(f"still up at the end ({kind}): {did}: {state}")
        out.append(f"end of the run ({kind}): Redis counts {f.get('redis_count')}, proxies "
                   f"carry {f.get('live')}, ghosts {f.get('ghosts')}, uncounted "
                   f"{f.get('uncounted')}; {f.get('calls')} calls, {f.get('emergency_calls')} "
                   f"emergency ({len(f.get('emergency_not_admitted', []))} not admitted); "
                   f"{f.get('cdr_records_followed')} call-end records followed, "
                   f"{f.get('cdr_missing_overall')} missing")
    for r in result.rows:
        if r.problems:
            out.append(f"- {r.fault}: " + "; ".join(r.problems))
        if r.notes:
            out.append(f"  {r.fault} (notes): " + "; ".join(r.notes))
    for e in result.errors:
        out.append(f"- ERROR {e}")
    if result.workdir:
        out.append(f"logs: {result.workdir}")
    return "\n".join(out)


def load_results(path: Path) -> list[FlavourResult]:
    """The results a run wrote with ``--json``."""
    out = []
    for d in json.loads(path.read_text()):
        rows = [RowResult(**r) for r in d.pop("rows")]
        out.append(FlavourResult(rows=rows, **d))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lab.chaos",
        description="The fault matrix (issue 15 item 4): faults injected into real Redis, "
                    "Kamailio and SIPp processes under load, and what they did to the counts "
                    "(docs/reliability.md, \"Fault matrix\").")
    p.add_argument("--flavour", default="native", choices=[*FLAVOURS, "all"])
    p.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                   help=f"comma-separated, of: {', '.join(FAULTS)} [all]")
    p.add_argument("--rate", type=float, help="ordinary calls per second through each of "
                   f"the two proxies [{Options.rate:g}; --quick: 30]")
    p.add_argument("--hold", type=float, default=Options.hold_s,
                   help="seconds an answered call lasts [%(default)s]")
    p.add_argument("--emergency-rate", type=float, default=Options.emergency_rate)
    p.add_argument("--emergency-hold", type=float, default=Options.emergency_hold_s)
    p.add_argument("--recovery", type=float, default=Options.recovery_s,
                   help="seconds of traffic after each fault [%(default)s]")
    p.add_argument("--warmup", type=float, default=Options.warmup_s)
    p.add_argument("--sample", type=float, default=Options.sample_s,
                   help="seconds between two samples of the counts [%(default)s]")
    p.add_argument("--quick", action="store_true",
                   help=f"only {', '.join(QUICK_FAULTS)}, shorter waits")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--workdir", type=Path, help="logs here (default: a temporary directory, "
                   "removed when every row is clean)")
    p.add_argument("--keep", action="store_true", help="keep the logs of a clean run")
    p.add_argument("--monitor", action="store_true",
                   help="write Redis's MONITOR stream to the workdir (diagnostics)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="print the report of an earlier run's --json FILE, run nothing")
    args = p.parse_args(argv)
    if args.report:
        for result in load_results(args.report):
            print(report(result), end="\n\n")
        return 0
    faults = QUICK_FAULTS if args.quick else [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults: {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    flavours = FLAVOURS if args.flavour == "all" else (args.flavour,)
    results = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for flavour in flavours:
        opts = Options(flavour=flavour, faults=faults,
                       rate=args.rate or (30 if args.quick else Options.rate),
                       hold_s=args.hold, emergency_rate=args.emergency_rate,
                       emergency_hold_s=7 if args.quick else args.emergency_hold,
                       recovery_s=6.5 if args.quick else args.recovery,
                       warmup_s=3 if args.quick else args.warmup, sample_s=args.sample,
                       workdir=(args.workdir / flavour) if args.workdir else None,
                       keep=args.keep, verbose=not args.quiet, monitor=args.monitor)
        result = run_flavour(opts)
        results.append(result)
        print(report(result), flush=True)
        print(flush=True)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1,
                                            default=str))
    return 0 if all(r.clean for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
