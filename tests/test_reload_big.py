"""Big policies in a running proxy, with a real Redis: a reload is read, compiled and
loaded off the tick (the node keeps its lease meanwhile), a prefixes_file change is
noticed like a policy change, and FUNCTION LOAD has its own control-plane timeout and
retries, apart from the decision path's store_timeout."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lab.redis_server import RedisServer
from policer.compile import RECOVERY_MS
from policer.engine import Engine, Prepared
from policer.policy import Policy, load_policy
from policer.store import RedisStore, StoreError
from policer.store.redis_store import INLINE_LOAD_BYTES, LOAD_ATTEMPTS
from tests.support import call, new_namespace, wait_for
from tests.support.cli import run_cli
from tests.support.policies import policy_yaml, when


def write(tmp: Path, ns: str, prefixes: list[str], premium_max: int = 0,
          store_timeout: str = "2s", load_timeout: str = "10s", lease: str = "3s",
          renew: str = "500ms") -> Path:
    (tmp / "premium.txt").write_text("# test list\n" + "\n".join(prefixes) + "\n")
    path = tmp / "policy.yaml"
    path.write_text(policy_yaml(
        ns, classes={"emergency": {"numbers": ["112"]},
                     "premium": {"prefixes_file": "premium.txt"}, "other": {"default": True}},
        profiles={"total": {}, "premium": when("premium")},
        limits={"total": 100,
                "premium": {"max": premium_max, "reject": {"code": 403, "reason": "Barred"}}},
        store_timeout=store_timeout, load_timeout=load_timeout,
        nodes={"lease": lease, "renew": renew}))
    return path


def prefixes(n: int, first: int = 10**7) -> list[str]:
    return [f"0900{first + i * 13}" for i in range(n)]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may pause."""
    server = RedisServer().start()
    yield server
    server.stop()


# ----------------------------------------------------------------------------- item 2


def test_a_reload_slower_than_the_lease_keeps_the_lease_renewed(
        tmp_path: Path, redis_url: str, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A big policy (200,000 prefixes) whose reload takes longer than the node's lease
    (made so: its preparation waits a lease more): the ticks go on renewing the lease,
    a second node sweeping lost nodes ends none of this node's calls, and the new
    policy is swapped in whole by a later tick."""
    path = write(tmp_path, namespace, prefixes(10))
    lease_ms = load_policy(path).nodes.lease_ms
    real_prepare = Engine.prepare
    preparing = threading.Event()

    def slow_prepare(self: Engine, policy: Policy) -> Prepared:
        preparing.set()
        time.sleep(lease_ms / 1000 * 1.5)  # longer than the lease: a blocked tick loses it
        return real_prepare(self, policy)

    monkeypatch.setattr(Engine, "prepare", slow_prepare)
    store = RedisStore(redis_url, namespace, timeout_ms=2000)
    node = Engine(load_policy(path), store, node="big-a", lease=True, watch=path,
                  watch_interval=0)
    sweeper = Engine(load_policy(path), RedisStore(redis_url, namespace, timeout_ms=2000),
                     node="big-b", lease=True)
    node.start()
    sweeper.start()
    held = node.admit(call("5551234", call_id="held"))
    assert held.admitted and not held.fallback

    stop = threading.Event()

    def sweep() -> None:  # another proxy: ends the calls of nodes whose lease lapsed
        while not stop.wait(0.1):
            sweeper.tick()

    other = threading.Thread(target=sweep)
    other.start()
    big = prefixes(200_000)
    try:
        write(tmp_path, namespace, big)
        leases: list[int] = []
        deadline = time.monotonic() + 120
        while node.policy.classes[1].prefixes[-1:] != (big[-1],):
            assert time.monotonic() < deadline, "the reload never finished"
            node.tick()
            end, now = store.nodes()["big-a"], store.now_ms()
            assert end > now, "the node's lease lapsed during the reload"
            leases.append(end)
            time.sleep(0.1)
    finally:
        stop.set()
        other.join()
    assert preparing.is_set()
    assert "node_lost" not in store.ended()
    assert store.profile_size("total") == 1
    assert len(set(leases)) >= 3  # renewed again and again while the reload ran
    # the new policy decides, in Redis and in the engine
    d = node.admit(call(big[123_456] + "77"))
    assert (d.admitted, d.code, d.number_class) == (False, 403, "premium")
    assert store.loaded_hash() == node.store.library.policy_hash  # type: ignore[attr-defined]
    node.store.close()
    sweeper.store.close()


def test_a_changed_prefixes_file_is_reloaded_and_a_broken_one_keeps_the_old(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    path = write(tmp_path, namespace, ["0900"])
    e = Engine(load_policy(path), RedisStore(redis_url, namespace, timeout_ms=2000),
               node="n", watch=path, watch_interval=0)
    assert e.admit(call("09001")).number_class == "premium"
    listed = tmp_path / "premium.txt"
    listed.write_text("0137\n")  # the policy file itself does not change
    e.tick()
    assert e.admit(call("09001")).number_class == "other"
    assert e.admit(call("01371")).number_class == "premium"
    with capture_logs() as logs:
        listed.write_text("0137\nnot-a-prefix!\n")
        e.tick()
    assert e.admit(call("01371")).number_class == "premium"  # the old policy serves
    failed = [x for x in logs if x["event"] == "policy_reload_failed"]
    assert failed and failed[0]["errors"] == [
        f"{listed}:2:1: classes.premium.prefixes_file: not a dialled number or prefix: "
        "'not-a-prefix!'"]
    listed.write_text("0138\n")  # fixed: the list is still watched after the failure
    e.tick()
    assert e.admit(call("01381")).number_class == "premium"
    e.store.close()


def test_a_deeply_nested_policy_in_a_reload_is_a_reload_error_not_a_tick_error(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    path = write(tmp_path, namespace, ["0900"])
    e = Engine(load_policy(path), RedisStore(redis_url, namespace, timeout_ms=2000),
               node="n", lease=True, watch=path, watch_interval=0)
    e.start()
    with capture_logs() as logs:
        path.write_text("a: " + "[" * 5000)

        def reload_failed() -> bool:  # the reload runs in the background; a tick
            e.tick()                  # waits for it only so long
            return any(x["event"] == "policy_reload_failed" for x in logs)

        wait_for(reload_failed, 20)
    events = [x["event"] for x in logs]
    assert "tick_failed" not in events
    failed = [x for x in logs if x["event"] == "policy_reload_failed"]
    assert failed[0]["errors"] == [
        f"{path}:1:103: (syntax): collections nested more than 100 deep"]
    assert e.admit(call("09001")).number_class == "premium"
    e.store.close()


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
    # (Redis lost its state: admits are held while the nodes put their calls back)
    store.clock_offset_ms += RECOVERY_MS
    e.breaker.success()
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
