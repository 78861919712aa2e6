"""The main job, for real (``bin/demo``): a private Redis, two Kamailio proxies
(native flavour, ``deploy/kamailio/run``) enforcing ``policies/example.yaml``, a
SIPp upstream that answers every call, and SIPp callers sending a mix of local,
domestic, international and emergency calls from many users and accounts
(``X-Account``) through both proxies, hard enough to reach the limits.

A live view (``policer top``'s frame) shows each profile's count against its
limit and the rejections per second, while callers run; then they stop, every
call ends, and the counts return to zero. Everything started here is stopped
here. Exit status 0 when every count returned to zero, 1 when not, 2 when the
lab could not be started.

    python -m lab.demo                  # about 45 s
    python -m lab.demo --seconds 120 --rate 60
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from lab import proxy
from lab.proxy import DEPLOY, KAMCMD
from lab.redis_server import RedisServer, RedisServerError, free_media_ports, free_udp_port
from policer.policy import Policy, load_policy
from policer.snapshot import Snapshot, take_snapshot
from policer.store import open_store
from policer.top import render

__all__ = ["main", "run"]

ROOT = Path(__file__).resolve().parent.parent
SIPP = shutil.which("sipp") or "/usr/bin/sipp"

ACCOUNTS = ("acme", "globex", "initech", "umbrella", "hooli", "")
#: (share of calls, example numbers) per number class of policies/example.yaml
NUMBERS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.55, ("5551234", "5559876", "4401000", "7654321")),  # local
    (0.20, ("0301234567", "0897654321", "0401112233")),  # domestic
    (0.20, ("00442071234567", "+33142685300", "0014155550100")),  # international
    (0.05, ("112", "911")),  # emergency: admitted even when limits are reached
)


def callers_csv(path: Path, users: int, rows: int, seed: int) -> None:
    """SIPp -inf file for deploy/kamailio/sipp/uac.xml: user;account;number."""
    rnd = random.Random(seed)
    lines = ["RANDOM"]
    for _ in range(rows):
        user = f"user{rnd.randrange(users):03d}"
        account = rnd.choice(ACCOUNTS)
        pick, acc = rnd.random(), 0.0
        number = NUMBERS[-1][1][0]
        for share, numbers in NUMBERS:
            acc += share
            if pick < acc:
                number = rnd.choice(numbers)
                break
        lines.append(f"{user};{account};{number};")
    path.write_text("\n".join(lines) + "\n")


class Lab:
    """The processes of one demo run; :meth:`close` stops every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.redis: RedisServer | None = None
        self.proxies: list[tuple[str, int, Path]] = []

    def spawn(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            p = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                 start_new_session=True)
        self.procs.append((name, p))
        return p

    def start_proxy(self, node: str, policy: Path, redis_url: str, upstream: int) -> int:
        port = free_udp_port()
        runtime = Path(tempfile.mkdtemp(prefix="pd-"))  # short: unix socket paths
        env = proxy.proxy_env(policy=policy, redis_url=redis_url, port=port,
                              upstream_port=upstream, flavour="native", node=node,
                              runtime=runtime, children=4, shm_mb=128)
        proc = proxy.start_proxy(env, self.workdir / f"kamailio-{node}.log", self.workdir)
        self.procs.append((f"kamailio-{node}", proc))
        self.proxies.append((node, port, runtime))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"kamailio {node} exited: see {self.workdir}/kamailio-{node}.log")
            if proxy.ready(runtime):
                return port
            time.sleep(0.2)
        raise RuntimeError(f"kamailio {node} not ready in 20 s")

    def active_dialogs(self) -> int:
        return sum(max(0, proxy.active_dialogs(runtime)) for _, _, runtime in self.proxies)

    def close(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for _, p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            # the whole group: Kamailio's workers too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for _, _, runtime in self.proxies:
            shutil.rmtree(runtime, ignore_errors=True)
        if self.redis is not None:
            self.redis.stop()


def _frame(out: TextIO, policy: Policy, now: Snapshot, before: Snapshot | None,
           seconds: float, title: str) -> None:
    width = shutil.get_terminal_size((100, 24)).columns
    text = render(policy, now, before, seconds, width)
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    out.write(f"{clear}{title}\n{text}\n\n")
    out.flush()


def _all_zero(snap: Snapshot) -> bool:
    return (all(r.count == 0 for r in (*snap.rows, *snap.values))
            and snap.stats.get("active", 0) == 0)


def run(seconds: float = 30.0, rate: int = 40, hold_ms: int = 4000, users: int = 200,
        policy: Path = ROOT / "policies" / "example.yaml", drain_timeout: float = 30.0,
        keep: bool = False, out: TextIO = sys.stdout) -> int:
    missing = [n for n, p in (("sipp", SIPP), ("kamcmd", KAMCMD)) if not os.access(p, os.X_OK)]
    if not shutil.which("kamailio") and not os.access("/usr/sbin/kamailio", os.X_OK):
        missing.append("kamailio")
    if missing:
        print(f"demo: needs kamailio, kamcmd and sipp ({', '.join(missing)} "
              "missing): run bin/setup", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="policer-demo-"))
    lab = Lab(workdir)
    zero = False
    try:
        lab.redis = RedisServer().start()
        url = lab.redis.url
        uas_port = free_udp_port()
        lab.spawn("sipp-upstream", [SIPP, "-sf", str(DEPLOY / "sipp" / "uas.xml"), "-i",
                                    "127.0.0.1", "-p", str(uas_port), "-mp",
                                    str(free_media_ports()), "-nostdin"])
        ports = [lab.start_proxy(node, policy, url, uas_port) for node in ("demo-a", "demo-b")]
        loaded = load_policy(policy)
        store = open_store(url, loaded.namespace, timeout_ms=2000, policy=loaded)
        out.write(f"demo: redis {url}, proxies demo-a 127.0.0.1:{ports[0]} and demo-b "
                  f"127.0.0.1:{ports[1]} (native flavour), upstream 127.0.0.1:{uas_port}, "
                  f"policy {policy}\n")

        calls = max(1, int(rate * seconds))
        for i, port in enumerate(ports):
            csv = workdir / f"callers-{i}.csv"
            callers_csv(csv, users, 2000, seed=i)
            lab.spawn(f"sipp-callers-{i}", [
                SIPP, f"127.0.0.1:{port}", "-sf", str(DEPLOY / "sipp" / "uac.xml"),
                "-inf", str(csv), "-i", "127.0.0.1", "-p", str(free_udp_port()),
                "-mp", str(free_media_ports()), "-r", str(rate), "-m", str(calls),
                "-d", str(hold_ms), "-nostdin", "-timeout", f"{int(seconds + 60)}s",
                "-recv_timeout", "10000",
            ])
        callers = [p for name, p in lab.procs if name.startswith("sipp-callers")]

        t0 = time.monotonic()
        before: Snapshot | None = None
        t_before = t0
        phase = "callers running"
        end_by = t0 + seconds + hold_ms / 1000 + drain_timeout
        while time.monotonic() < end_by:
            time.sleep(1.0)
            now = take_snapshot(loaded, store, 5)
            t_now = time.monotonic()
            running = any(p.poll() is None for p in callers)
            if not running:
                phase = "callers stopped: calls ending"
            title = (f"policer demo - {t_now - t0:4.0f}s  {phase}  (2 Kamailio proxies, "
                     f"{2 * rate} calls/s offered, hold {hold_ms / 1000:g}s; Ctrl-C stops)")
            _frame(out, loaded, now, before, t_now - t_before, title)
            before, t_before = now, t_now
            if not running and _all_zero(now):
                zero = True
                break
        final = take_snapshot(loaded, store, 5)
        zero = _all_zero(final)
        dialogs = lab.active_dialogs()
        stats = final.stats
        out.write(
            f"demo: processed {stats.get('processed', 0)}, rejected {stats.get('rejected', 0)}"
            f", active now {stats.get('active', 0)}; Kamailio dialogs now {dialogs}: "
            + ("every count is back to zero.\n" if zero and dialogs == 0
               else "counts did NOT return to zero.\n"))
        zero = zero and dialogs == 0
    except KeyboardInterrupt:
        out.write("demo: interrupted\n")
    except (RuntimeError, RedisServerError, OSError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    finally:
        lab.close()
        if keep:
            out.write(f"demo: logs kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    out.write("demo: stopped Redis, both proxies and SIPp.\n")
    return 0 if zero else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bin/demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long callers place calls")
    p.add_argument("--rate", type=int, default=40, help="new calls per second per proxy")
    p.add_argument("--hold", type=float, default=4.0, help="seconds an answered call lasts")
    p.add_argument("--users", type=int, default=200, help="distinct calling users")
    p.add_argument("--policy", type=Path, default=ROOT / "policies" / "example.yaml")
    p.add_argument("--keep", action="store_true", help="keep the logs directory")
    a = p.parse_args(argv)
    return run(seconds=a.seconds, rate=a.rate, hold_ms=int(a.hold * 1000), users=a.users,
               policy=a.policy, keep=a.keep)


if __name__ == "__main__":
    sys.exit(main())
