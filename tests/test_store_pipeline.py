"""The store's admit pipeline (``policer.store.pipeline``): admits sent from an event
loop on a connection the pipeline opens itself from the client's public settings,
against real ``redis-server`` processes: plain TCP, a Unix socket, a database other
than 0 with RESP3 and a client name, AUTH (a password, an ACL user), TLS with client
certificates, the primary a Sentinel names; a refused password, a reply later than
the store timeout, a connection Redis closes. (``policer serve``'s workers use it:
tests/test_serve*.py.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from lab.redis_server import RedisServer
from policer.call import Call
from policer.store import MemoryStore, RedisStore, StoreError
from policer.store.base import CallResult
from policer.store.pipeline import Admit, AdmitPipeline, Result, admit_pipeline
from tests.support import policy_text, wait_for
from tests.support.sentinel import SENTINEL_SERVICE, SentinelServer
from tests.support.tls import TLSRedisServer, make_certificates, tls_url

POLICY = """
version: 1
namespace: pipe
classes:
  local: {default: true}
profiles:
  total: {}
  user: {value: from_user}
limits:
  total: {max: 2}
store_timeout: 2s
"""
PASSWORD = "p1pe/pw:XQZ@7"


def _call(i: int, user: str = "alice") -> Call:
    return Call.from_raw(f"pipe-{i}@test", "ft", from_user=user, from_domain="example.net",
                         ruri_user="5551234")


def _store(url: str, namespace: str, **kw: Any) -> RedisStore:
    policy = policy_text(POLICY, namespace)
    store = RedisStore(url, namespace, policy.store_timeout_ms, policy=policy, **kw)
    store.load(policy)
    return store


class Loop:
    """An event loop with one pipeline, driven from the test."""

    def __init__(self, store: RedisStore, timeout_s: float = 2.0) -> None:
        self.loop = asyncio.new_event_loop()
        self.timeout_s = timeout_s
        self.opened = 0
        pipeline = admit_pipeline(store, "pipe-node", self.loop, lambda: self.timeout_s,
                                  self._opened)
        assert pipeline is not None
        self.pipeline: AdmitPipeline = pipeline
        self.store = store

    def _opened(self) -> None:
        self.opened += 1

    def open(self) -> AdmitPipeline:
        """Open the connection (one attempt); the pipeline, ready or not."""
        before = self.opened
        self.loop.call_soon(self.pipeline.open)
        self.run(lambda: self.opened > before)
        return self.pipeline

    def run(self, done: Any, timeout: float = 20) -> None:
        async def until() -> None:
            deadline = time.monotonic() + timeout
            while not done():
                assert time.monotonic() < deadline, "timed out"
                await asyncio.sleep(0.005)

        self.loop.run_until_complete(until())

    def until_ready(self, timeout: float = 20) -> None:
        """Asks the pipeline to open until it is (it tries every RETRY_S at most)."""
        def ready() -> bool:
            self.pipeline.open()
            return self.pipeline.ready

        self.run(ready, timeout)

    def send(self, calls: list[Call]) -> dict[int, Result]:
        """The calls sent in one write; their results come into the dict, by index."""
        got: dict[int, Result] = {}
        now = time.perf_counter()

        def into(i: int) -> Callable[[Result], None]:
            return lambda r: got.__setitem__(i, r)

        admits = [Admit(c, self.store.deadline_ms(), now, into(i))
                  for i, c in enumerate(calls)]
        self.loop.call_soon(self.pipeline.send, admits)
        self.run(lambda: True)  # sent
        return got

    def admit(self, calls: list[Call]) -> list[Result]:
        """The calls sent in one write; their results, in order."""
        got = self.send(calls)
        self.run(lambda: len(got) == len(calls))
        return [got[i] for i in range(len(calls))]

    def close(self) -> None:
        self.pipeline.close()
        self.loop.run_until_complete(asyncio.sleep(0.01))
        self.loop.close()


@pytest.fixture
def private() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _decides(url: str, namespace: str, **kw: Any) -> Loop:
    """Three calls on the pipeline, against a total of 2: the function decided them."""
    store = _store(url, namespace, **kw)
    loop = Loop(store)
    try:
        assert loop.open().ready, loop.pipeline.why
        results = loop.admit([_call(i) for i in range(3)])
        assert all(isinstance(r, CallResult) for r in results), results
        assert [r.admitted for r in results if isinstance(r, CallResult)] == [
            True, True, False]
        assert store.profile_size("total") == 2
        # the same dialogs through the store's own client: the decisions made
        again = store.admit_call(_call(0), "pipe-node")
        assert again.duplicate and again.admitted
    except BaseException:
        loop.close()
        raise
    return loop


def test_plain_tcp(private: RedisServer, namespace: str) -> None:
    _decides(private.url, namespace).close()


def test_a_database_resp3_and_a_client_name(private: RedisServer, namespace: str) -> None:
    url = f"redis://127.0.0.1:{private.port}/3?protocol=3&client_name=policer-pipe"
    loop = _decides(url, namespace)
    try:
        c = redis.Redis(host="127.0.0.1", port=private.port, decode_responses=True)
        clients = {x["name"]: x for x in c.client_list()}
        assert clients["policer-pipe"]["db"] == "3"
        assert clients["policer-pipe"]["resp"] == "3"
        assert c.dbsize() == 0  # nothing in database 0
        c.close()
    finally:
        loop.close()


def test_a_unix_socket(tmp_path: Path, namespace: str) -> None:
    path = tmp_path / "redis.sock"
    with RedisServer(extra_args=["--unixsocket", str(path), "--unixsocketperm", "700"]):
        assert wait_for(path.exists, 10)
        _decides(f"unix://{path}?db=0", namespace).close()


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[RedisServer]:
    """A Redis whose default user needs PASSWORD, with an ACL user ``policer`` that may
    run the library and nothing it does not need."""
    server = RedisServer().start()
    try:
        c = redis.Redis(host=server.host, port=server.port)
        c.execute_command("ACL", "SETUSER", "policer", "on", "resetkeys", "~policer:*",
                          "-@all", "+@read", "+@write", "+@scripting", "+@connection",
                          "+@transaction", "+time", "-@dangerous", "+function|load",
                          f">{PASSWORD}")
        c.config_set("requirepass", PASSWORD)
        c.close()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("user", ["", "policer"])
@pytest.mark.parametrize("resp", ["2", "3"])
def test_auth(auth_redis: RedisServer, namespace: str, user: str, resp: str) -> None:
    url = f"redis://{user}:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_redis.port}/0" \
          f"?protocol={resp}"
    _decides(url, namespace).close()


def test_a_refused_password_is_a_reason_without_the_password(auth_redis: RedisServer,
                                                             namespace: str) -> None:
    _store(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_redis.port}/0",
                  namespace)
    wrong = RedisStore(f"redis://:wr0ng-XQZ@127.0.0.1:{auth_redis.port}/0", namespace,
                       policy=policy_text(POLICY, namespace))
    loop = Loop(wrong)
    try:
        assert not loop.open().ready
        why = loop.pipeline.why
        assert "WRONGPASS" in why or "invalid" in why.lower(), why
        assert "wr0ng" not in why
        # nothing sent, every call told why
        (r,) = loop.admit([_call(1)])
        assert isinstance(r, StoreError) and not r.maybe_applied
    finally:
        loop.close()


def test_tls(tmp_path: Path, namespace: str) -> None:
    server = TLSRedisServer(make_certificates(tmp_path), ("--requirepass", PASSWORD)).start()
    try:
        _decides(tls_url(server, PASSWORD), namespace).close()
    finally:
        server.stop()


def test_the_primary_a_sentinel_names(private: RedisServer, namespace: str) -> None:
    with SentinelServer(private.port, quorum=1) as sentinel:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SENTINEL_SERVICE}/0"
        _decides(url, namespace).close()


def test_a_late_reply_gives_up_the_calls_in_flight(private: RedisServer,
                                                   namespace: str) -> None:
    store = _store(private.url, namespace)
    loop = Loop(store, timeout_s=0.2)
    c = redis.Redis.from_url(private.url)
    try:
        assert loop.open().ready
        c.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        results = loop.admit([_call(1), _call(2)])
        for r in results:
            assert isinstance(r, StoreError) and r.maybe_applied and "no reply" in str(r)
        assert not loop.pipeline.ready  # dropped; another one is being opened
        # once Redis answers again, a new connection decides again
        loop.until_ready()
        (r,) = loop.admit([_call(3)])
        assert isinstance(r, CallResult) and r.admitted
    finally:
        c.close()
        loop.close()


def test_a_broken_connection_gives_up_the_calls_in_flight(private: RedisServer,
                                                          namespace: str) -> None:
    """Redis frozen with two calls in flight, then killed: the connection breaks, both
    calls get a StoreError that says their requests may have been applied; Redis
    started again (empty), another connection is opened, and answers."""
    store = _store(private.url, namespace)
    loop = Loop(store, timeout_s=30)
    try:
        assert loop.open().ready
        private.signal(signal.SIGSTOP)
        got = loop.send([_call(1), _call(2)])
        private.signal(signal.SIGKILL)  # stopped: killed before it reads them
        private.kill()
        loop.run(lambda: len(got) == 2)
        for r in got.values():
            assert isinstance(r, StoreError) and r.maybe_applied, r
            assert "ConnectionError" in str(r)
        private.start()
        opened = loop.opened
        loop.until_ready()
        assert loop.opened > opened
        (r,) = loop.admit([_call(3)])  # an empty Redis: no library (its caller loads it)
        assert isinstance(r, StoreError) and "function" in str(r).lower()
    finally:
        loop.close()


def test_an_error_reply_is_the_calls_store_error(private: RedisServer,
                                                 namespace: str) -> None:
    """Redis lost the library: the call's result is the error (its caller decides
    again through the store's own client, which loads it)."""
    store = _store(private.url, namespace)
    loop = Loop(store)
    c = redis.Redis.from_url(private.url)
    try:
        assert loop.open().ready
        c.function_flush()
        (r,) = loop.admit([_call(1)])
        assert isinstance(r, StoreError) and not r.maybe_applied
        assert "function" in str(r).lower()
        assert loop.pipeline.ready  # the connection stays
    finally:
        c.close()
        loop.close()


def test_stores_without_a_pipeline(namespace: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        policy = policy_text(POLICY, namespace)
        assert admit_pipeline(MemoryStore(namespace, policy=policy), "n", loop,
                              lambda: 1.0) is None
        cluster = RedisStore("redis+cluster://127.0.0.1:1", namespace, policy=policy)
        assert admit_pipeline(cluster, "n", loop, lambda: 1.0) is None
        # a TLS check redis-py makes and the pipeline does not (OCSP): no pipeline

        def ocsp() -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=1, ssl=True, ssl_validate_ocsp=True)

        ocsp_store = RedisStore("rediss://127.0.0.1:1", namespace, policy=policy,
                                client_factory=ocsp)
        assert admit_pipeline(ocsp_store, "n", loop, lambda: 1.0) is None
    finally:
        loop.close()
