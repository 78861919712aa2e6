"""A count is a live call after any fault, through ``policer serve`` (issues 15 and 21):
a frozen Redis leaves no ghost call whatever worker an admit and its release reach,
and a second service with the same node name refuses to start."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import redis

from lab.redis_server import RedisServer
from policer.policy import load_policy
from policer.store import RedisStore
from tests.support import wait_for
from tests.support.cli import policy_copy
from tests.support.serve import Serve, body


def _store(policy_path: Path, url: str) -> RedisStore:
    policy = load_policy(policy_path)
    store = RedisStore(url, policy.namespace, 5000)
    store.use(policy)
    return store


def test_two_workers_leave_no_ghost_after_a_freeze(tmp_path: Path, namespace: str) -> None:
    """Issue 21: eight clients each admit a call on one connection and release it on
    another, so admit and release often reach different workers. Redis is frozen 2 s:
    the admits are answered by the fallback (admitted) and their records queued in one
    worker, the releases queued or answered in the other. The release that comes
    first wins: after every release was answered, nothing counts (it was 338-784 calls,
    for the 120 s early timeout)."""
    with RedisServer() as private:
        path = policy_copy(tmp_path, namespace, replace={
            "on_store_error: admit": "on_store_error: admit\nstore_timeout: 50ms"})
        s = Serve(tmp_path, {"POLICER_REDIS_URL": private.url, "POLICER_POLICY": str(path)},
                  "--workers", "2")
        store = _store(path, private.url)
        stop = threading.Event()
        answered = [0]
        errors: list[str] = []

        def client(n: int) -> None:
            a, r = s.connection(), s.connection()
            i = 0
            try:
                while not stop.is_set():
                    i += 1
                    st, out = s.post("/v1/admit", body(f"w{n}-{i}", from_user=f"u{n}"), conn=a)
                    if st != 200:
                        errors.append(f"admit {st} {out}")
                        continue
                    if out["admitted"]:
                        st, out = s.post("/v1/release", {"dialog_id": out["dialog_id"]},
                                         conn=r)
                        if st not in (200, 202):
                            errors.append(f"release {st} {out}")
                        answered[0] += 1
            finally:
                a.close()
                r.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        try:
            for t in threads:
                t.start()
            time.sleep(0.5)
            private.signal(signal.SIGSTOP)
            time.sleep(2.0)
            private.signal(signal.SIGCONT)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            assert not errors, errors[:5]
            assert answered[0] > 50
            # every queue drained (a tick a second in each worker), nothing counts
            assert wait_for(lambda: store.profile_size("total") == 0, 10), \
                f"calls still counted: {store.profile_list('total')}"
            assert store.stats()["active"] == 0
            assert store.stats()["recorded"] > 0  # the fallback's calls were recorded ...
        finally:
            stop.set()
            s.stop()
            store.close()


def test_a_frozen_redis_leaves_no_ghost_from_a_given_up_admit(tmp_path: Path,
                                                              namespace: str) -> None:
    """The service gives up on Redis at store_timeout and its fallback rejects; the
    admits Redis reads after it resumes write nothing."""
    with RedisServer() as private:
        path = policy_copy(tmp_path, namespace, replace={
            "on_store_error: admit": "on_store_error: reject\nstore_timeout: 50ms"})
        s = Serve(tmp_path, {"POLICER_REDIS_URL": private.url, "POLICER_POLICY": str(path)})
        store = _store(path, private.url)
        try:
            assert s.post("/v1/admit", body("warm"))[1]["admitted"]
            s.post("/v1/release", {"dialog_id": "warm;ft"})
            private.signal(signal.SIGSTOP)
            try:
                outs = [s.post("/v1/admit", body(f"f{i}", from_user=f"u{i}"))[1]
                        for i in range(3)]
            finally:
                time.sleep(0.2)
                private.signal(signal.SIGCONT)
            assert all(o["fallback"] and not o["admitted"] for o in outs)
            time.sleep(2.5)  # the queued settlements are applied by a tick
            assert store.profile_size("total") == 0 and store.stats()["active"] == 0
            # the INVITE sent again is decided normally
            again = s.post("/v1/admit", body("f0", from_user="u0"))[1]
            assert again["admitted"] and not again["fallback"] and not again["duplicate"]
        finally:
            s.stop()
            store.close()


def test_a_redis_restarted_empty_decides_again_within_seconds(tmp_path: Path,
                                                              namespace: str) -> None:
    """Admits keep coming while Redis restarts empty: the decisions' probes fail on the
    missing library, yet the service's tick loads it (whatever the breaker says) and the
    store decides again within a few seconds (it took 7.5 s, and a whole fault-matrix row
    of fallback decisions, while the tick waited for a probe slot the admits took)."""
    with RedisServer() as private:
        path = policy_copy(tmp_path, namespace, replace={
            "on_store_error: admit": "on_store_error: reject\nstore_timeout: 50ms"})
        s = Serve(tmp_path, {"POLICER_REDIS_URL": private.url, "POLICER_POLICY": str(path)})
        stop = threading.Event()
        decided: list[tuple[float, bool]] = []  # (when, by the store)

        def client() -> None:
            conn, i = s.connection(), 0
            try:
                while not stop.is_set():
                    i += 1
                    st, out = s.post("/v1/admit", body(f"r{i}", from_user=f"u{i % 50}"),
                                     conn=conn)
                    if st == 200:
                        decided.append((time.monotonic(), not out["fallback"]))
                        if out["admitted"]:
                            s.post("/v1/release", {"dialog_id": out["dialog_id"]}, conn=conn)
                    time.sleep(0.01)
            finally:
                conn.close()

        t = threading.Thread(target=client)
        try:
            t.start()
            assert wait_for(lambda: any(ok for _, ok in decided), 5)
            private.restart()  # empty
            back = time.monotonic()
            assert wait_for(lambda: any(ok and w > back + 0.1 for w, ok in decided), 4), \
                f"{sum(w > back for w, _ in decided)} admits since the restart, none decided " \
                "by the store"
        finally:
            stop.set()
            t.join(timeout=30)
            s.stop()


def test_a_second_service_with_the_same_node_name_refuses_to_start(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    path = policy_copy(tmp_path, namespace)
    env = {"POLICER_REDIS_URL": redis_url, "POLICER_POLICY": str(path),
           "POLICER_NODE": "edge-serve"}
    first = Serve(tmp_path, env)
    try:
        assert first.post("/v1/admit", body("n1"))[1]["admitted"]
        second = None
        try:
            second = Serve(tmp_path, env)
        except AssertionError as e:
            text = str(e)
            assert "exited 2" in text and "edge-serve" in text and "POLICER_NODE" in text
        else:
            raise AssertionError("the second policer serve started")
        finally:
            if second is not None:
                second.stop()
        client = redis.Redis.from_url(redis_url)
        store = _store(path, redis_url)
        assert store.profile_size("total") == 1  # the first one's call still counts
        store.close()
        client.close()
    finally:
        first.stop()
