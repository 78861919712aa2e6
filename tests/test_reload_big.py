"""Big policies in a running proxy, with a real Redis: FUNCTION LOAD has its own
control-plane timeout and retries, apart from the decision path's store_timeout."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lab.redis_server import RedisServer
from policer.engine import Engine
from policer.policy import load_policy
from policer.store import RedisStore, StoreError
from policer.store.redis_store import INLINE_LOAD_BYTES, LOAD_ATTEMPTS
from tests.support import call, new_namespace, wait_for
from tests.support.cli import run_cli

POLICY = """version: 1
namespace: {ns}
classes:
  emergency: {{numbers: ["112"]}}
  premium: {{prefixes_file: premium.txt}}
  other: {{default: true}}
profiles:
  total: {{}}
  premium: {{when: {{class: premium}}}}
limits:
  total: {{max: 100}}
  premium: {{max: {premium_max}, reject: {{code: 403, reason: Barred}}}}
store_timeout: {store_timeout}
load_timeout: {load_timeout}
nodes: {{lease: {lease}, renew: {renew}}}
"""


def write(tmp: Path, ns: str, prefixes: list[str], premium_max: int = 0,
          store_timeout: str = "2s", load_timeout: str = "10s", lease: str = "3s",
          renew: str = "500ms") -> Path:
    (tmp / "premium.txt").write_text("# test list\n" + "\n".join(prefixes) + "\n")
    path = tmp / "policy.yaml"
    path.write_text(POLICY.format(ns=ns, premium_max=premium_max, store_timeout=store_timeout,
                                  load_timeout=load_timeout, lease=lease, renew=renew))
    return path


def prefixes(n: int, first: int = 10**7) -> list[str]:
    return [f"0900{first + i * 13}" for i in range(n)]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may pause."""
    server = RedisServer().start()
    yield server
    server.stop()


# ----------------------------------------------------------------------------- item 3


def test_function_load_is_bounded_by_load_timeout_not_store_timeout(
        tmp_path: Path, own_redis: RedisServer, namespace: str) -> None:
    """A library whose load takes far longer than the decision path's store_timeout
    (5 ms) loads: each try is bounded by the policy's load_timeout (10 s), and the
    store keeps its store_timeout for everything else."""
    path = write(tmp_path, namespace, prefixes(150_000), store_timeout="5ms")
    policy = load_policy(path)
    store = RedisStore(own_redis.url, namespace, timeout_ms=policy.store_timeout_ms,
                       policy=policy)
    assert (store.timeout_ms, store.load_timeout_ms) == (5, 10_000)
    policy_hash = store.load(policy)
    checker = RedisStore(own_redis.url, namespace, timeout_ms=5000)
    assert checker.loaded_hash() == policy_hash
    assert store.timeout_ms == 5
    checker.close()
    store.close()


def test_a_big_library_is_not_loaded_inside_a_decision(
        tmp_path: Path, own_redis: RedisServer, namespace: str) -> None:
    """Redis restarted empty: a decision that finds no library falls back at once
    instead of loading a big one inside the call (it used to, with the decision's
    timeout, again at every call); the node's tick loads it."""
    path = write(tmp_path, namespace, prefixes(40_000), store_timeout="2s")
    policy = load_policy(path)
    store = RedisStore(own_redis.url, namespace, timeout_ms=2000)
    e = Engine(policy, store, node="n", lease=True)
    e.start()
    assert len(store.library.text) > INLINE_LOAD_BYTES
    own_redis.restart()
    d = e.admit(call("5551234"))
    assert d.fallback and "too big to load inside a decision" in (d.error or "")
    assert store.loaded_hash() is None
    e.tick()
    assert store.loaded_hash() == store.library.policy_hash
    assert not e.admit(call("5551234")).fallback
    store.close()


def test_a_failed_load_is_tried_again_then_says_why(
        tmp_path: Path, own_redis: RedisServer, namespace: str) -> None:
    path = write(tmp_path, namespace, ["0900"], load_timeout="200ms")
    policy = load_policy(path)
    store = RedisStore(own_redis.url, namespace, timeout_ms=2000)
    store.load(policy)
    # Redis frozen for longer than every try: the load fails after LOAD_ATTEMPTS tries
    own_redis.signal(signal.SIGSTOP)
    try:
        with capture_logs() as logs, pytest.raises(StoreError) as exc:
            store.load(policy)
    finally:
        own_redis.signal(signal.SIGCONT)
    message = str(exc.value)
    assert message.startswith(f"FUNCTION LOAD of library {store.library.name} (")
    assert f"failed after {LOAD_ATTEMPTS} tries in " in message
    assert "TimeoutError" in message and "load_timeout, 200 ms" in message
    retries = [x for x in logs if x["event"] == "policy_load_retry"]
    assert [x["attempt"] for x in retries] == list(range(1, LOAD_ATTEMPTS))
    # frozen for less than the tries take: a later try (or the first, answered late) wins
    own_redis.signal(signal.SIGSTOP)
    timer = threading.Timer(0.6, own_redis.signal, (signal.SIGCONT,))
    timer.start()
    try:
        assert store.load(policy) == store.library.policy_hash
    finally:
        timer.join()
    assert store.loaded_hash() == store.library.policy_hash
    store.close()


def test_a_library_redis_refuses_is_not_tried_again(own_redis: RedisServer) -> None:
    from dataclasses import replace

    store = RedisStore(own_redis.url, new_namespace(), timeout_ms=2000)
    broken = replace(store.library, text=store.library.text.replace("local function",
                                                                    "local function (", 1))
    with capture_logs() as logs, pytest.raises(StoreError, match=r"failed at once in .*Error "
                                                                  r"compiling"):
        store.load_library(broken)
    assert not [x for x in logs if x["event"] == "policy_load_retry"]  # no second try
    store.close()


def test_policer_load_exits_non_zero_with_the_reason(tmp_path: Path,
                                                     own_redis: RedisServer) -> None:
    path = write(tmp_path, new_namespace(), ["0900"], load_timeout="200ms")
    env = {"POLICER_REDIS_URL": own_redis.url, "POLICER_POLICY": str(path)}
    assert run_cli("load", env=env).returncode == 0
    own_redis.signal(signal.SIGSTOP)
    try:
        proc = run_cli("load", env=env, timeout=60)
    finally:
        own_redis.signal(signal.SIGCONT)
    assert proc.returncode == 3
    assert "policer: store error at" in proc.stderr
    assert "FUNCTION LOAD of library" in proc.stderr or "Timeout" in proc.stderr
    assert wait_for(own_redis.ping, 5)
