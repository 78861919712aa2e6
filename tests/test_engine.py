"""The engine as a proxy uses it: one call is one call even when its INVITE
comes twice, what each dialog records, and answers that keep coming when the
store fails or forgets its scripts."""

from __future__ import annotations

import pytest
import redis

from lab.redis_server import RedisServer, free_port
from policer.compile import RECOVERY_MS
from policer.engine import Engine
from policer.policy import Policy
from policer.store import RedisStore, Store, StoreError
from tests.support import STORE_TIMEOUT_MS, EngineFactory, call
from tests.support.policies import (
    ACCOUNT,
    INTERNATIONAL,
    INTERNATIONAL_CLASSES,
    build_policy,
    when,
)


def engine_policy(on_store_error: str = "admit", total: int = 2,
                  namespace: str = "eng") -> Policy:
    return build_policy(
        namespace, attributes=ACCOUNT,
        classes=INTERNATIONAL_CLASSES,
        profiles={"total": {}, "international": when("international"), "user": "from_user",
                  "account": "account"},
        limits={"total": total, "international": {"max": 1, "reject": INTERNATIONAL}},
        reject={"code": 503, "reason": "Call Limit Reached", "retry_after": 30},
        on_store_error=on_store_error)


def test_an_invite_resent_with_credentials_is_one_call(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(engine_policy())
    first = call("5551234", "alice", call_id="auth@x", from_tag="ft1")
    d1 = e.admit(first)
    d2 = e.admit(call("5551234", "alice", call_id="auth@x", from_tag="ft1"))  # after a 407
    assert d1.admitted and not d1.duplicate
    assert d2.admitted and d2.duplicate and d2.dialog_id == d1.dialog_id
    assert store.profile_size("total") == 1
    assert store.stats()["processed"] == 1
    # another From-tag is another dialog (a forked or new call)
    assert not e.admit(call("5551234", "alice", call_id="auth@x", from_tag="ft2")).duplicate
    assert store.profile_size("total") == 2


def test_a_rejected_invite_resent_stays_rejected(engine_for: EngineFactory) -> None:
    e = engine_for(engine_policy())
    assert e.admit(call("0049301", "a")).admitted
    d = e.admit(call("0049302", "b", call_id="intl2@x"))
    assert (d.admitted, d.code, d.reason, d.retry_after) == (False, 403, "International Limit",
                                                             None)
    again = e.admit(call("0049302", "b", call_id="intl2@x"))
    assert (again.admitted, again.code, again.duplicate, again.limit) == (
        False, 403, True, "international")


def test_a_dialog_records_the_call_and_the_node(engine_for: EngineFactory) -> None:
    e = engine_for(engine_policy())
    c = call("0049301", "alice", call_id="rec@x", headers={"X-Account": "acme"},
             source_ip="192.0.2.7")
    d = e.admit(c)
    assert d.memberships == ("total", "international", "user=alice", "account=acme")
    assert d.number_class == "international"
    info = e.dialog(d.dialog_id)
    assert info is not None and info.state == "early"
    assert info.info["node"] == "test-node"
    assert info.info["call_id"] == "rec@x"
    assert info.info["from"] == "alice@example.net"
    assert info.info["to"] == "0049301"
    assert info.info["class"] == "international"
    assert info.info["source_ip"] == "192.0.2.7"
    assert e.set_var(d.dialog_id, "billing", "gold")
    assert e.confirm(d.dialog_id)
    assert e.refresh(d.dialog_id, 60)
    rec = e.release(d.dialog_id, "bye")
    assert rec is not None and rec.node == "test-node" and rec.variables == {"billing": "gold"}
    assert rec.as_dict()["Profiles"] == ["total", "international", "user=alice",
                                         "account=acme"]
    assert e.release(d.dialog_id, "bye") is None


def test_the_node_defaults_to_policer_node(monkeypatch: pytest.MonkeyPatch,
                                           store: Store) -> None:
    monkeypatch.setenv("POLICER_NODE", "proxy-7")
    policy = engine_policy(namespace=store.namespace)
    e = Engine(policy, store)
    store.load(policy)
    d = e.admit(call("5551234"))
    info = e.dialog(d.dialog_id)
    assert info is not None and info.info["node"] == "proxy-7"


def test_explain_changes_nothing_and_predicts_admit(engine_for: EngineFactory,
                                                    store: Store) -> None:
    e = engine_for(engine_policy())
    assert e.admit(call("5551234", "a")).admitted
    before = store.stats()
    x = e.explain(call("0049301", "b", call_id="x@x"))
    assert store.stats() == before
    assert [(v.profile, v.count, v.max) for v in x.limits] == [
        ("total", 1, 2), ("international", 0, 1), ("user", 0, -1)]
    assert x.decision.admitted
    assert e.admit(call("5551234", "c")).admitted
    x = e.explain(call("5551234", "d", call_id="y@x"))
    assert not x.decision.admitted and x.decision.limit == "total"
    assert not e.admit(call("5551234", "d", call_id="y@x")).admitted


def test_reload_applies_a_new_limit_on_the_next_invite(engine_for: EngineFactory) -> None:
    e = engine_for(engine_policy())
    for i in range(2):
        assert e.admit(call("5551234", f"u{i}")).admitted
    assert not e.admit(call("5551234", "late")).admitted
    e.reload(engine_policy(total=3, namespace=e.store.namespace))
    assert e.admit(call("5551234", "later")).admitted
    with pytest.raises(ValueError, match="namespace"):
        e.reload(engine_policy(namespace="another"))


# ----------------------------------------------------------------------------- store failures


@pytest.fixture
def dead_store() -> RedisStore:
    """A Redis store whose server is not there (nothing listens on the port)."""
    return RedisStore(f"redis://127.0.0.1:{free_port()}/0", "dead", timeout_ms=200)


@pytest.mark.parametrize("mode", ["admit", "reject"])
def test_a_store_failure_is_answered_by_on_store_error(dead_store: RedisStore,
                                                       mode: str) -> None:
    e = Engine(engine_policy(mode, namespace="dead"), dead_store, node="n")
    d = e.admit(call("5551234", "alice"))
    assert d.fallback and d.error
    if mode == "admit":
        assert (d.admitted, d.code) == (True, 200)
    else:
        assert (d.admitted, d.code, d.reason, d.retry_after) == (
            False, 503, "Call Limit Reached", 30)
    sos = e.admit(call("112", "alice"))
    assert sos.admitted and sos.fallback  # emergency calls are always admitted
    # dialog events never raise at the proxy either
    assert e.confirm(d.dialog_id) is False
    assert e.refresh(d.dialog_id) is False
    assert e.set_var(d.dialog_id, "x", "1") is False
    assert e.get_var(d.dialog_id, "x") is None
    assert e.release(d.dialog_id) is None


def test_a_library_deleted_from_redis_is_loaded_again(redis_url: str, namespace: str) -> None:
    store = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    e = Engine(engine_policy("reject", namespace=namespace), store, node="n")
    d = e.admit(call("5551234", "a"))
    assert d.admitted
    client = redis.Redis.from_url(redis_url)
    client.execute_command("FUNCTION", "DELETE", store.library.name)
    client.close()
    d2 = e.admit(call("5551234", "b"))
    assert d2.admitted and not d2.fallback
    assert e.confirm(d2.dialog_id) and e.release(d.dialog_id) is not None
    d3 = e.admit(call("5551234", "c"))
    assert d3.admitted and not d3.fallback
    assert store.profile_size("total") == 2
    assert store.loaded_hash() == store.library.policy_hash


def test_a_store_without_the_policy_never_loads_a_library_of_its_own(
        redis_url: str, namespace: str) -> None:
    """A tool that reads counts (no policy) must not load a policy-less library into a
    namespace proxies use: their calls would then be decided with no profile at all."""
    reader = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS)
    with pytest.raises(StoreError, match="policer load"):
        reader.profile_size("total")
    assert reader.loaded_hash() is None
    e = Engine(engine_policy("reject", namespace=namespace),
               RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS), node="n")
    assert e.admit(call("5551234", "a")).admitted  # the engine loads its policy's library
    assert reader.profile_size("total") == 1


def test_a_restarted_redis_is_used_again() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, "restart", timeout_ms=STORE_TIMEOUT_MS)
        e = Engine(engine_policy("reject", namespace="restart"), store, node="n")
        assert not e.admit(call("5551234", "a")).fallback
        server.restart()  # empty, library gone, connections broken
        # the broken connection is reopened and the library loaded again inside the
        # first call; the counts are empty, so the fallback decides (reject) while the
        # nodes put their calls back (RECOVERY_MS)
        d = e.admit(call("5551234", "u0"))
        assert (d.admitted, d.fallback) == (False, True) and "recovering" in d.error
        store.clock_offset_ms += RECOVERY_MS
        e.breaker.success()
        decisions = [e.admit(call("5551234", f"u{i}")) for i in range(1, 4)]
        # then every call is decided normally again
        assert [(d.admitted, d.fallback) for d in decisions] == [
            (True, False), (True, False), (False, False)]
        assert store.profile_size("total") == 2
        store.close()


def test_an_engine_from_the_environment_needs_its_policy_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback to a relative path: a proxy started without POLICER_POLICY
    fails at once, saying what is missing."""
    monkeypatch.delenv("POLICER_POLICY", raising=False)
    with pytest.raises(ValueError, match="POLICER_POLICY is not set"):
        Engine.from_env()
