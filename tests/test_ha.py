"""High availability: Redis Sentinel failover under a steady call load, and the
store URL forms (``redis+sentinel://``, ``redis+cluster://``).

The failover test starts real processes on loopback (a primary, a replica,
three sentinels), runs an engine with a steady admit/release load in a
thread, kills the primary with SIGKILL, and measures what the proxies would
see: the outage (first fallback decision to first real decision), the calls
decided by the fallback, writes lost by asynchronous replication, and the
over-admission after the failover. Run it with ``-s`` to see the figures
(recorded in ``docs/reliability.md``).

The cluster tests live in ``tests/cluster/``.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from lab.redis_server import RedisServer, find_redis_server, free_port
from policer.call import Call
from policer.engine import Engine
from policer.policy import Policy
from policer.store import RedisStore, StoreError, open_store
from policer.store.connect import parse_store_url
from tests.support import wait_for
from tests.support.policies import build_policy
from tests.support.sentinel import SENTINEL_SERVICE, SentinelServer

SERVICE = SENTINEL_SERVICE


@dataclass
class SentinelSet:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def master_port(self) -> int | None:
        """The primary the sentinels name now (the first sentinel that answers)."""
        for s in self.sentinels:
            try:
                c = redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=1,
                                decode_responses=True)
                addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                c.close()
                if addr:
                    return int(addr[1])
            except (redis.RedisError, OSError):
                continue
        return None

    def stop(self) -> None:
        for p in (*self.sentinels, self.replica, self.primary):
            p.stop()


def _wait(what: str, ok: Callable[[], object], timeout: float) -> None:
    if not wait_for(ok, timeout):
        raise AssertionError(f"timed out waiting for {what}")


def _info(port: int, section: str) -> dict[str, str]:
    c = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
    try:
        raw = c.execute_command("INFO", section)
    finally:
        c.close()
    if isinstance(raw, dict):
        return {k: str(v) for k, v in raw.items()}
    return dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)


def start_sentinel_set() -> SentinelSet:
    if find_redis_server() is None:
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
    primary = RedisServer().start()
    started: list[RedisServer] = [primary]
    try:
        replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        started.append(replica.start())
        _wait("the replica's link", lambda: _info(replica.port, "replication").get(
            "master_link_status") == "up", 20)
        sentinels = []
        for _ in range(3):
            s = SentinelServer(primary.port)
            started.append(s.start())
            sentinels.append(s)

        def known() -> bool:
            for s in sentinels:
                c = redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=1,
                                decode_responses=True)
                m = c.execute_command("SENTINEL", "MASTER", SERVICE)
                c.close()
                state = dict(zip(m[::2], m[1::2], strict=False)) if isinstance(m, list) else m
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
            return True

        # sentinels find each other and the replica through hello messages (every 2 s)
        _wait("the sentinels to know each other and the replica", known, 30)
    except BaseException:
        for p in reversed(started):
            p.stop()
        raise
    return SentinelSet(primary, replica, sentinels)


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    ss = start_sentinel_set()
    try:
        yield ss
    finally:
        ss.stop()


def ha_policy(namespace: str, maximum: int, on_error: str) -> Policy:
    return build_policy(namespace, limits={"total": maximum},
                        timeouts={"early": "120s", "dialog": "1h"}, on_store_error=on_error,
                        store_timeout="250ms")


@dataclass
class Load:
    """A steady admit/release load from one thread, as one proxy worker makes it.

    Every ``interval`` seconds a call is offered; an admitted call (by the store
    or by the fallback) is held for a random time and then released through
    the engine, which queues what the store cannot take and applies it when
    the store answers again. ``tick()`` runs every 100 ms, as a proxy's timer.
    """

    engine: Engine
    interval: float = 0.005
    hold: tuple[float, float] = (0.3, 0.9)
    stop: threading.Event = field(default_factory=threading.Event)
    live: dict[str, tuple[float, bool]] = field(default_factory=dict)  # did -> (end, by store)
    #: (time, admitted, fallback, calls up at that time)
    events: list[tuple[float, bool, bool, int]] = field(default_factory=list)
    released: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=2000))
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pending(self) -> int:
        return len(getattr(self.engine, "pending", ()))

    def run(self) -> None:
        rng = random.Random(7)
        n = 0
        next_t = next_tick = time.monotonic()
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                self._end_calls(now)
                if now >= next_tick:
                    self._tick()
                    next_tick = now + 0.1
                n += 1
                call = Call.from_raw(f"ha-{n}-{uuid.uuid4().hex[:6]}@test", "ft",
                                     from_user=f"u{n % 50}", from_domain="example.net",
                                     ruri_user="5551234")
                d = self.engine.admit(call)
                t = time.monotonic()
                with self.lock:
                    if d.admitted:
                        self.live[d.dialog_id] = (t + rng.uniform(*self.hold), not d.fallback)
                    self.events.append((t, d.admitted, d.fallback, len(self.live)))
                next_t += self.interval
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_t = time.monotonic()
            # the end: every call ends, and what the engine queued is applied
            self._end_calls(float("inf"))
            def drained() -> bool:
                self._tick()
                return not self.pending()

            wait_for(drained, 30)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def _tick(self) -> None:
        tick = getattr(self.engine, "tick", None)
        if tick is not None:
            tick()

    def _end_calls(self, now: float) -> None:
        with self.lock:
            ending = [did for did, (end, _) in self.live.items() if end <= now]
            for did in ending:
                del self.live[did]
        for did in ending:
            if self.engine.release(did, "bye") is not None:
                self.released.append((time.monotonic(), did))


@pytest.mark.slow
@pytest.mark.parametrize(("on_error", "replica_behind_s"), [
    ("admit", 0.0),
    ("reject", 0.0),
    # the replication link cut 0.5 s before the kill (the replica kept from
    # reconnecting): the primary's last half second of writes never reaches it
    ("admit", 0.5),
], ids=["fail-open", "fail-closed", "fail-open-link-cut"])
def test_sentinel_failover_under_load(sentinel_set: SentinelSet, namespace: str,
                                      on_error: str, replica_behind_s: float) -> None:
    maximum = 40
    policy = ha_policy(namespace, maximum, on_error)
    store = open_store(sentinel_set.url(), namespace, timeout_ms=policy.store_timeout_ms)
    assert isinstance(store, RedisStore)
    engine = Engine(policy, store, node="ha-node")
    load = Load(engine)
    thread = threading.Thread(target=load.run, name="load", daemon=True)
    thread.start()
    try:
        def at_the_limit() -> bool:  # steady state: the limit reached and enforced
            with load.lock:
                rejected = any(not ok for _, ok, _, _ in load.events)
            return rejected and store.profile_size("total") >= maximum - 5

        _wait("the limit to be reached", at_the_limit, 30)
        with load.lock:
            steady = list(load.events)
        assert steady and not any(fb for _, _, fb, _ in steady), "fallback before the kill"
        assert maximum - 5 <= store.profile_size("total") <= maximum  # at the limit

        # the kill: what the primary acknowledged just now may not have reached the replica
        if replica_behind_s:
            # a wrong masterauth keeps the replica from reconnecting (and resyncing)
            replica = redis.Redis(host="127.0.0.1", port=sentinel_set.replica.port)
            replica.config_set("masterauth", "not-the-password")
            replica.close()
            admin = redis.Redis(host="127.0.0.1", port=sentinel_set.primary.port)
            admin.execute_command("CLIENT", "KILL", "TYPE", "replica")
            admin.close()
            time.sleep(replica_behind_s)
        with load.lock:
            live_by_store = {did for did, (_, by_store) in load.live.items() if by_store}
        released_before = {did for t, did in load.released
                           if t > time.monotonic() - 1.0 - replica_behind_s}
        old_primary = sentinel_set.primary.port
        t_kill = time.monotonic()
        sentinel_set.primary.kill()

        def resumed() -> bool:
            with load.lock:
                return any(t > t_kill and not fb for t, _, fb, _ in load.events)

        _wait("decisions to resume on the promoted replica", resumed, 30)
        t_resumed = time.monotonic()
        # the sentinels learn of the promotion one by one (the leader first, the
        # others from its hello messages): the first to answer may still name the old
        assert sentinel_set.replica.port != old_primary
        _wait("the sentinels to name the promoted replica",
              lambda: sentinel_set.master_port() == sentinel_set.replica.port, 10)

        # writes lost by asynchronous replication: admitted calls the new primary
        # does not know (an ended dialog is kept 32 s), released calls it counts again
        lost_admits = sum(1 for did in live_by_store if store.dialog(did) is None)
        resurrected = sum(1 for did in released_before
                          if (d := store.dialog(did)) is not None and d.state != "ended")

        # after the failover: until every call up at that time has ended, and the new
        # primary has both admitted and rejected calls
        with load.lock:
            up_at_resume = set(load.live)

        def settled() -> bool:
            with load.lock:
                decided = {ok for t, ok, fb, _ in load.events if t > t_resumed and not fb}
                return not up_at_resume & load.live.keys() and decided == {True, False}

        _wait("the calls up at the failover to end", settled, 30)
        load.stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert not load.errors, load.errors
    finally:
        load.stop.set()
        thread.join(timeout=60)

    events = load.events
    after_kill = [e for e in events if e[0] > t_kill]
    fallback = [e for e in after_kill if e[2]]
    first_fb = min((e[0] for e in fallback), default=t_kill)
    first_real = min(e[0] for e in after_kill if not e[2])
    real_after = [e for e in after_kill if e[0] >= first_real]
    assert real_after and all(not e[2] for e in real_after), "fallback after the failover"
    admitted_real_after = sum(1 for e in real_after if e[1])
    assert admitted_real_after > 0 and any(not e[1] for e in real_after)  # real decisions
    # over-admission: calls really up at once (store- and fallback-admitted) over the max
    peak_outage = max((e[3] for e in after_kill if e[0] < first_real), default=0)
    over_after = [e[3] - maximum for e in real_after]
    peak_over_after = max(0, *over_after)
    back_within = max((e[0] for e in real_after if e[3] > maximum), default=first_real)
    figures = {
        "on_store_error": on_error,
        "replication_cut_before_kill_s": replica_behind_s,
        "outage_s": round(first_real - t_kill, 2),
        "fallback_window_s": round(first_real - first_fb, 2) if fallback else 0.0,
        "detected_after_s": round(t_resumed - t_kill, 2),
        "calls_offered_during_outage": len([e for e in after_kill if e[0] < first_real]),
        "calls_decided_by_fallback": len(fallback),
        "admitted_by_store_live_at_kill": len(live_by_store),
        "lost_admits": lost_admits,
        "resurrected_releases": resurrected,
        "peak_live_during_outage": peak_outage,
        "max": maximum,
        "peak_over_admission_after_failover": peak_over_after,
        "over_admission_cleared_after_s": round(max(0.0, back_within - first_real), 2),
        "offered_per_s": round(1 / load.interval),
    }
    print("\nREDIS-FAILOVER " + json.dumps(figures))
    out = os.environ.get("POLICER_HA_FIGURES")  # a directory: one JSON file per run
    if out:
        name = f"failover-{on_error}-{replica_behind_s}.json"
        Path(out, name).write_text(json.dumps(figures, indent=2) + "\n")

    assert first_real - t_kill < 20.0
    # over-admission after the failover comes only from calls admitted while the
    # store was unknown (fail-open) and from lost admits; it ends when they do
    assert back_within - first_real <= load.hold[1] + 1.0
    if on_error == "reject":  # fail-closed: only writes lost in the failover can over-admit
        assert peak_outage <= maximum + lost_admits
        assert peak_over_after <= lost_admits
    # every call has ended: the count is right again, except for releases lost
    # in the failover, which count until their deadline (or `policer reconcile`)
    store.close()
    check = open_store(sentinel_set.url(), namespace, timeout_ms=2000)
    assert check.profile_size("total") == resurrected
    check.close()


@pytest.mark.slow
def test_a_sentinel_url_naming_no_known_service_is_a_store_error(
        sentinel_set: SentinelSet, namespace: str) -> None:
    url = sentinel_set.url().replace(f"/{SERVICE}/", "/nosuchservice/")
    store = open_store(url, namespace, timeout_ms=500)
    policy = ha_policy(namespace, 1, "admit")
    d = Engine(policy, store, node="n").admit(
        Call.from_raw("x@test", "ft", from_user="a", from_domain="d", ruri_user="1"))
    assert d.fallback and d.admitted and "MasterNotFound" in d.error
    with pytest.raises(StoreError):
        store.profile_size("total")
    good = open_store(sentinel_set.url(), namespace, timeout_ms=2000, policy=policy)
    assert good.ping() and good.profile_size("total") == 0
    good.close()


# ----------------------------------------------------------------------------- URL forms


def test_sentinel_url_parts() -> None:
    u = parse_store_url("redis+sentinel://me:p%40ss@127.0.0.1:26379,[::1]:26380,h:1/svc/3"
                        "?sentinel_password=sp&ssl=true&ssl_ca_certs=/ca.pem")
    assert u.hosts == (("127.0.0.1", 26379), ("::1", 26380), ("h", 1))
    assert (u.username, u.password, u.service, u.db) == ("me", "p@ss", "svc", 3)
    assert u.sentinel_password == "sp"
    assert u.ssl == {"ssl": True, "ssl_ca_certs": "/ca.pem"}
    assert "p@ss" not in repr(u) and "sp" not in repr(u).replace("ssl", "")
    v = parse_store_url("redis+sentinel://:only@h:1/svc")
    assert (v.username, v.password, v.db) == (None, "only", 0)


def test_cluster_url_parts() -> None:
    u = parse_store_url("redis+cluster://policer:pw@a:7000,b:7001")
    assert u.hosts == (("a", 7000), ("b", 7001))
    assert (u.username, u.password) == ("policer", "pw")


@pytest.mark.parametrize("url", [
    "redis+sentinel://u:topsecret@h:1",                 # no service
    "redis+sentinel://u:topsecret@h:1/svc/x",           # db not a number
    "redis+sentinel://u:topsecret@h/svc",               # no port
    "redis+sentinel://u:topsecret@h:1/svc?bogus=1",     # unknown argument
    "redis+cluster://u:topsecret@h:1/5",                # cluster has db 0 only
    "redis+cluster://u:topsecret@h:1?ssl_ca_certs=/x",  # ssl_* without ssl=true
    "redis+sentinel://u:topsecret@h:99999/svc",
    "mysql://u:topsecret@h:1/0",
])
def test_malformed_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as e:
        open_store(url, "ns")
    assert "topsecret" not in str(e.value)


def test_a_cluster_nobody_listens_on_is_a_store_error(namespace: str) -> None:
    store = open_store(f"redis+cluster://policer:topsecret@127.0.0.1:{free_port()}",
                       namespace, timeout_ms=200)
    policy = ha_policy(namespace, 1, "admit")
    d = Engine(policy, store, node="n").admit(
        Call.from_raw("x@test", "ft", from_user="a", from_domain="d", ruri_user="1"))
    assert d.fallback and d.admitted and d.error
    assert "topsecret" not in d.error


# ----------------------------------------------------------------------------- deploy/redis

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "redis"


def _move_ports(text: str, ports: dict[int, int]) -> str:
    pattern = r"\b(" + "|".join(str(p) for p in ports) + r")\b"
    return re.sub(pattern, lambda m: str(ports[int(m.group(1))]), text)


class ConfServer(RedisServer):
    """A redis-server (or sentinel) run from one of ``deploy/redis``'s files, its
    ports and directory moved to free ones of this test."""

    def __init__(self, conf: Path, ports: dict[int, int], sentinel: bool = False) -> None:
        super().__init__()
        text = _move_ports(conf.read_text(), ports)
        text = "\n".join(f"dir {self.dir}" if ln.startswith("dir ") else ln
                         for ln in text.splitlines()) + f"\nlogfile {self.dir / 'redis.log'}\n"
        self.port = int(next(ln.split()[1] for ln in text.splitlines()
                             if ln.startswith("port ")))
        self.conf = self.dir / conf.name
        self.conf.write_text(text)
        self.sentinel = sentinel

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary, str(self.conf), *(["--sentinel"] if self.sentinel else [])]

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


@pytest.mark.slow
def test_the_sentinel_example_of_deploy_redis(namespace: str) -> None:
    """deploy/redis/sentinel/ as shipped (ports moved): the documented URL with
    the ACL user and the sentinels' password admits a call, and fails over."""
    ports = {p: free_port() for p in (6380, 6381, 26379, 26380, 26381)}
    procs: list[ConfServer] = []
    try:
        for name in ("primary.conf", "replica.conf"):
            procs.append(ConfServer(DEPLOY / "sentinel" / name, ports).start())
        for i in (1, 2, 3):
            conf = DEPLOY / "sentinel" / f"sentinel-{i}.conf"
            text = conf.read_text().replace("down-after-milliseconds policer 5000",
                                            "down-after-milliseconds policer 1000")
            fast = Path(procs[0].dir, conf.name)
            fast.write_text(text)
            procs.append(ConfServer(fast, ports, sentinel=True).start())
        sentinels = ",".join(f"127.0.0.1:{ports[p]}" for p in (26379, 26380, 26381))
        url = (f"redis+sentinel://policer:change-me-policer@{sentinels}/policer/0"
               "?sentinel_password=change-me-sentinel")
        policy = ha_policy(namespace, 1, "reject")
        engine = Engine(policy, open_store(url, namespace, timeout_ms=2000), node="n")

        def admitted(n: int) -> bool:
            d = engine.admit(Call.from_raw(f"dep-{n}@t", "ft", from_user="a", from_domain="d",
                                           ruri_user="1"))
            return d.admitted and not d.fallback

        _wait("the replica to catch up", lambda: _info_auth(
            ports[6381], "replication").get("master_link_status") == "up", 20)
        assert admitted(1)
        assert not engine.admit(Call.from_raw("dep-2@t", "ft", from_user="a", from_domain="d",
                                              ruri_user="1")).admitted  # max 1
        written = int(_info_auth(ports[6380], "replication")["master_repl_offset"])
        _wait("the sentinels to know each other", lambda: _sentinels_ready(
            [ports[p] for p in (26379, 26380, 26381)]), 30)
        _wait("the replica to have the call", lambda: int(_info_auth(
            ports[6381], "replication").get("slave_repl_offset", -1)) >= written, 20)
        procs[0].kill()

        def failed_over() -> bool:
            try:
                return engine.store.profile_size("total") == 1
            except StoreError:
                return False

        _wait("the failover", failed_over, 30)
        # the replica, now primary, still counts the call admitted before the kill
        assert not admitted(4)
        engine.release("dep-1@t;ft")
        assert admitted(5)
        engine.store.close()
    finally:
        for p in reversed(procs):
            p.stop()


def _info_auth(port: int, section: str) -> dict[str, str]:
    c = redis.Redis(host="127.0.0.1", port=port, password="change-me-default",
                    socket_timeout=1, decode_responses=True)
    try:
        return {k: str(v) for k, v in c.info(section).items()}
    finally:
        c.close()


def _sentinels_ready(ports: list[int]) -> bool:
    for port in ports:
        c = redis.Redis(host="127.0.0.1", port=port, password="change-me-sentinel",
                        socket_timeout=1, decode_responses=True)
        try:
            m = c.sentinel_master("policer")
        finally:
            c.close()
        assert isinstance(m, dict), m
        if int(m["num-other-sentinels"]) < 2 or int(m["num-slaves"]) < 1:
            return False
    return True


def test_the_cluster_example_of_deploy_redis(namespace: str) -> None:
    """deploy/redis/cluster/ as shipped (ports moved), joined by create.sh: the
    documented URL with the ACL user admits and releases."""
    ports = {p: free_port() for p in (7000, 7001, 7002)}
    bus = {p: free_port() for p in ports}
    procs: list[ConfServer] = []
    try:
        for p in ports:
            conf = DEPLOY / "cluster" / f"node-{p}.conf"
            s = ConfServer(conf, ports)
            s.conf.write_text(s.conf.read_text() + f"cluster-port {bus[p]}\n")
            procs.append(s.start())
        create = _move_ports((DEPLOY / "cluster" / "create.sh").read_text(), ports)
        script = procs[0].dir / "create.sh"
        script.write_text(create)
        subprocess.run(["sh", str(script)], check=True, capture_output=True, timeout=60)
        url = "redis+cluster://policer:change-me-policer@" + ",".join(
            f"127.0.0.1:{p}" for p in ports.values())

        def ready() -> bool:
            return all(_cluster_info(p).get("cluster_state") == "ok" for p in ports.values())

        _wait("the cluster", ready, 30)
        policy = ha_policy(namespace, 1, "reject")
        engine = Engine(policy, open_store(url, namespace, timeout_ms=2000), node="n")
        calls = [Call.from_raw(f"cl-{n}@t", "ft", from_user="a", from_domain="d",
                               ruri_user="1") for n in range(3)]
        d1 = engine.admit(calls[0])
        assert d1.admitted and not d1.fallback, d1.error
        d2 = engine.admit(calls[1])
        assert not d2.admitted and not d2.fallback
        assert engine.release(d1.dialog_id) is not None
        assert engine.admit(calls[2]).admitted
        engine.store.close()
    finally:
        for proc in reversed(procs):
            proc.stop()


def _cluster_info(port: int) -> dict[str, str]:
    c = redis.Redis(host="127.0.0.1", port=port, password="change-me-default",
                    socket_timeout=1, decode_responses=True)
    try:
        raw = str(c.execute_command("CLUSTER", "INFO"))
    finally:
        c.close()
    return dict(ln.strip().split(":", 1) for ln in raw.splitlines() if ":" in ln)
