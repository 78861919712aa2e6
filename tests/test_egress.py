"""Egress gateways: a call that passed admission is sent to a gateway only if that
gateway has room. Each attempt leaves the last attempt's gateway and takes this one's, all
or none; full, the proxy tries the next gateway; the dialog keeps the gateway it was
answered through until it ends. On both stores: every count equals the live calls after
every step."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lab.redis_server import RedisServer
from policer.engine import Engine
from policer.policy import Policy, load_policy
from policer.store import RedisStore, Store
from tests.support import EngineFactory, call
from tests.support.cli import run_cli
from tests.support.policies import build_policy, policy_yaml
from tests.support.serve import Serve
from tests.support.serve import body as serve_body

GW = ("10.0.0.1:5060", "10.0.0.2:5060", "10.0.0.3:5060")


def gateway_policy(**limits: Any) -> Policy:
    return build_policy(
        "egr", version=2,
        profiles={"total": {}, "trunk": "gateway",
                  "carrier": {"value": {"parent": "trunk"}}},
        limits=limits or {"total": 100, "trunk": {"values": {
            GW[0]: {"max": 2, "reject": {"code": 503, "reason": "Trunk Full"}},
            GW[1]: {"max": 2}}}},
        parents={"carrier": {GW[0]: "acme-carrier", GW[1]: "acme-carrier"}})


def env_namespace(env: dict[str, str]) -> str:
    return load_policy(env["POLICER_POLICY"]).namespace


def gateway_counts(store: Store) -> dict[str, int]:
    return {gw: store.profile_size("trunk", gw) for gw in GW}


def test_a_full_gateway_sends_the_call_to_the_next(engine_for: EngineFactory,
                                                   store: Store) -> None:
    e = engine_for(gateway_policy())
    placed: list[str] = []
    for _ in range(5):
        d = e.admit(call("5551000"))
        assert d.admitted
        for gw in GW:  # the dispatcher's order
            r = store.egress(d.dialog_id, gw)
            if r.taken:
                placed.append(gw)
                assert r.memberships[0] == f"trunk={gw}"
                break
            assert (r.code, r.kind, r.limit) == (503, "concurrent", "trunk")
    assert placed == [GW[0], GW[0], GW[1], GW[1], GW[2]]
    # each full gateway counted, cluster-wide (the exporter's policer_decisions); the
    # calls themselves were decided once each
    assert store.decisions()[("egress_full", "trunk")] == 4  # calls 3 and 4 once, 5 twice
    assert store.stats()["processed"] == 5
    assert gateway_counts(store) == {GW[0]: 2, GW[1]: 2, GW[2]: 1}
    assert store.profile_size("carrier", "acme-carrier") == 4
    assert store.profile_size("total") == 5


def test_a_failed_attempt_frees_its_gateway_at_once(engine_for: EngineFactory,
                                                    store: Store) -> None:
    e = engine_for(gateway_policy())
    a = e.admit(call("5551000"))
    assert store.egress(a.dialog_id, GW[0]).taken
    assert gateway_counts(store)[GW[0]] == 1
    # the gateway answered 503: the next attempt moves the call
    r = store.egress(a.dialog_id, GW[1])
    assert r.taken and gateway_counts(store) == {GW[0]: 0, GW[1]: 1, GW[2]: 0}
    assert store.profile_size("carrier", "acme-carrier") == 1  # moved, not added
    # asked again for the gateway it holds: counted once
    assert store.egress(a.dialog_id, GW[1]).taken
    assert gateway_counts(store)[GW[1]] == 1
    # no gateway left: '' leaves it
    assert store.egress(a.dialog_id, "").taken
    assert gateway_counts(store) == {GW[0]: 0, GW[1]: 0, GW[2]: 0}
    assert store.profile_size("total") == 1


def test_the_answered_gateway_is_kept_until_the_call_ends(engine_for: EngineFactory,
                                                          store: Store) -> None:
    e = engine_for(gateway_policy())
    ids = [e.admit(call("5551000")).dialog_id for _ in range(3)]
    for did in ids[:2]:
        assert store.egress(did, GW[0]).taken
    full = store.egress(ids[2], GW[0])
    assert (full.taken, full.reason, full.count, full.max) == (False, "Trunk Full", 2, 2)
    assert e.confirm(ids[0])
    e.release(ids[0])
    assert gateway_counts(store)[GW[0]] == 1
    assert store.egress(ids[2], GW[0]).taken  # the slot freed by the ended call
    for did in ids[1:]:
        e.release(did)
    assert gateway_counts(store) == {GW[0]: 0, GW[1]: 0, GW[2]: 0}
    assert store.profile_size("carrier", "acme-carrier") == 0
    assert store.profile_size("total") == 0


def test_a_gateway_may_have_a_rate(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(gateway_policy(trunk={"rate": {"max": 2, "per": "1m", "burst": 2}}))
    got = [store.egress(e.admit(call("1")).dialog_id, GW[2]) for _ in range(3)]
    assert [r.taken for r in got] == [True, True, False]
    assert (got[2].kind, got[2].limit) == ("rate", "trunk")


def test_the_admit_decides_the_first_gateway_with_the_call(engine_for: EngineFactory,
                                                          store: Store) -> None:
    """The proxy chose its first gateway before asking (``$du``, the attribute gateway):
    the admit takes it with the call, or admits the call without it and says the
    gateway is full (with the gateway limit's answer); only the next gateways cost an
    egress call. Every count equals the calls up after every step."""
    e = engine_for(gateway_policy())
    took = [e.admit(call("5551000", gateway=GW[0])) for _ in range(2)]
    for d in took:
        assert d.admitted and d.egress is not None and d.egress.taken
        assert f"trunk={GW[0]}" in d.memberships
    full = e.admit(call("5551000", gateway=GW[0]))
    assert full.admitted and full.code == 200
    g = full.egress
    assert g is not None and not g.taken
    assert (g.code, g.reason, g.limit, g.kind, g.count, g.max) == (
        503, "Trunk Full", "trunk", "concurrent", 2, 2)
    assert full.memberships == ("total",)  # no gateway, no carrier
    assert gateway_counts(store) == {GW[0]: 2, GW[1]: 0, GW[2]: 0}
    assert store.profile_size("carrier", "acme-carrier") == 2
    assert store.profile_size("total") == 3
    assert store.decisions()[("egress_full", "trunk")] == 1
    assert store.decisions()[("admitted", "total")] == 3
    assert store.decisions().get(("admitted", "trunk")) == 2
    # the next gateway: one egress call
    r = store.egress(full.dialog_id, GW[1])
    assert r.taken and gateway_counts(store) == {GW[0]: 2, GW[1]: 1, GW[2]: 0}
    assert store.profile_size("carrier", "acme-carrier") == 3
    # a retransmission of an admitted call: its decision again, the gateway not decided
    # (the proxy asks egress, which counts a gateway it holds once)
    again = e.admit(call("5551000", gateway=GW[0], call_id=took[0].dialog_id.split(";")[0]))
    assert again.duplicate and again.egress is None
    for d in (*took, full):
        e.release(d.dialog_id)
    assert gateway_counts(store) == {GW[0]: 0, GW[1]: 0, GW[2]: 0}
    assert store.profile_size("carrier", "acme-carrier") == 0
    assert store.profile_size("total") == 0


def test_a_full_gateway_never_rejects_a_call_a_limit_rejects_it(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(gateway_policy(total=1, trunk={"values": {GW[0]: {"max": 0}}}))
    a = e.admit(call("5551000", gateway=GW[0]))
    assert a.admitted and a.egress is not None and not a.egress.taken
    b = e.admit(call("5551000", gateway=GW[0]))  # total is full: rejected by it
    assert (b.admitted, b.limit, b.egress) == (False, "total", None)
    # no gateway in the call: nothing decided for it
    e.release(a.dialog_id)
    c = e.admit(call("5551000"))
    assert c.admitted and c.egress is None
    e.release(c.dialog_id)
    assert store.profile_size("total") == 0 and sum(store.profile_values("trunk").values()) == 0


def test_a_full_gateway_spends_none_of_its_rate(engine_for: EngineFactory,
                                                store: Store) -> None:
    """A gateway with a rate and a cap: a call admitted without it spends nothing of
    its rate (it was not sent there)."""
    e = engine_for(gateway_policy(trunk={"max": 1, "rate": {"max": 2, "per": "1m",
                                                            "burst": 2}}))
    a = e.admit(call("1", gateway=GW[2]))
    b = e.admit(call("1", gateway=GW[2]))  # full by its cap
    assert a.egress and a.egress.taken and b.egress and not b.egress.taken
    assert b.egress.kind == "concurrent"
    e.release(a.dialog_id)
    # the rate had one call spent: the second call of the minute still goes
    c = e.admit(call("1", gateway=GW[2]))
    assert c.egress and c.egress.taken
    for d in (b, c):
        e.release(d.dialog_id)
    assert sum(store.profile_values("trunk").values()) == 0


def test_an_emergency_call_takes_its_first_gateway_over_its_limit(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(build_policy(
        "egr", version=2, classes={"emergency": {"numbers": ["112"]},
                                   "other": {"default": True}},
        profiles={"trunk": "gateway"}, limits={"trunk": 1}))
    assert e.admit(call("5551000", gateway=GW[0])).egress.taken  # type: ignore[union-attr]
    sos = e.admit(call("112", gateway=GW[0]))
    assert sos.admitted and sos.bypass and sos.egress is not None and sos.egress.taken
    assert gateway_counts(store)[GW[0]] == 2


def test_the_admit_with_a_gateway_over_http(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(policy_yaml(env_namespace(env), version=2,
                                profiles={"trunk": "gateway"},
                                limits={"trunk": {"values": {GW[0]: {"max": 1}}}}))
    env = {**env, "POLICER_POLICY": str(path)}
    serve = Serve(tmp_path, env)
    try:
        a = serve.post("/v1/admit", {**serve_body("eg-1"), "gateway": GW[0]})[1]
        b = serve.post("/v1/admit", {**serve_body("eg-2"), "gateway": GW[0]})[1]
        assert a["egress"]["taken"] is True
        assert (b["admitted"], b["egress"]["taken"], b["egress"]["limit"]) == (
            True, False, "trunk")
        c = serve.post("/v1/admit", serve_body("eg-3"))[1]
        assert c["egress"] is None
        for d in (a, b, c):
            serve.post("/v1/release", {"dialog_id": d["dialog_id"]})
        assert run_cli("profile", "size", "trunk", GW[0], env=env).stdout == "0\n"
    finally:
        serve.stop()


def test_an_unknown_dialog_may_go_and_counts_nothing(engine_for: EngineFactory,
                                                     store: Store) -> None:
    engine_for(gateway_policy())
    r = store.egress("nobody;x", GW[0])
    assert (r.taken, r.known) == (True, False)
    assert gateway_counts(store)[GW[0]] == 0


def test_an_emergency_call_is_sent_over_a_full_gateway(engine_for: EngineFactory,
                                                       store: Store) -> None:
    e = engine_for(build_policy(
        "egr", version=2, classes={"emergency": {"numbers": ["112"]},
                                   "other": {"default": True}},
        profiles={"trunk": "gateway"}, limits={"trunk": 1}))
    assert store.egress(e.admit(call("5551000")).dialog_id, GW[0]).taken
    assert not store.egress(e.admit(call("5551000")).dialog_id, GW[0]).taken
    sos = store.egress(e.admit(call("112")).dialog_id, GW[0])
    assert (sos.taken, sos.bypass) == (True, True)
    assert gateway_counts(store)[GW[0]] == 2


@pytest.mark.parametrize("gateway", ["", "x" * 5000, "\udcff\udcfe:5060", "a,b:c|d\n"])
def test_any_gateway_value_is_taken_or_refused_cleanly(engine_for: EngineFactory,
                                                       store: Store, gateway: str) -> None:
    e = engine_for(gateway_policy(trunk=1))
    d = e.admit(call("5551000"))
    r = store.egress(d.dialog_id, gateway)
    assert r.taken and len(r.memberships) == (1 if gateway else 0)
    if gateway:
        assert store.profile_size("trunk", gateway) == 1
        # full for the next call at the same gateway: the value is one key, however odd
        assert not store.egress(e.admit(call("5551000")).dialog_id, gateway).taken
    e.release(d.dialog_id)
    assert sum(store.profile_values("trunk").values()) == 0


def test_egress_over_http_and_the_command_line(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(policy_yaml(env_namespace(env), version=2,
                                profiles={"trunk": "gateway"},
                                limits={"trunk": {"values": {GW[0]: {"max": 1}}}}))
    env = {**env, "POLICER_POLICY": str(path)}
    serve = Serve(tmp_path, env)
    try:
        a = serve.post("/v1/admit", serve_body("eg-1"))[1]
        b = serve.post("/v1/admit", serve_body("eg-2"))[1]
        status, took = serve.post("/v1/egress", {"dialog_id": a["dialog_id"],
                                                 "gateway": GW[0]})
        assert (status, took["taken"], took["memberships"]) == (
            200, True, [f"trunk={GW[0]}"])
        # the command line answers the same, exit 1 when full
        full = run_cli("egress", b["dialog_id"], "--gateway", GW[0], "--json", env=env)
        assert full.returncode == 1
        assert json.loads(full.stdout)["taken"] is False
        status, http_full = serve.post("/v1/egress", {"dialog_id": b["dialog_id"],
                                                      "gateway": GW[0]})
        assert http_full == json.loads(full.stdout)
        ok = run_cli("egress", b["dialog_id"], "--gateway", GW[1], env=env)
        assert ok.returncode == 0 and ok.stdout.startswith(f"taken {GW[1]}")
        # an id policer never gave (another key, a huge one) is refused before Redis
        for bad_id in ("x}{y;z", "a;" + "b" * 5000):
            refused = run_cli("egress", bad_id, "--gateway", GW[0], env=env)
            assert refused.returncode == 2 and "not a dialog id" in refused.stderr
        for bad in ({"dialog_id": a["dialog_id"]}, {"dialog_id": "{x}", "gateway": "g"},
                    {"dialog_id": a["dialog_id"], "gateway": 5},
                    {"dialog_id": a["dialog_id"], "gateway": "x" * 5000}):
            assert serve.post("/v1/egress", bad)[0] == 400
        for did in (a["dialog_id"], b["dialog_id"]):
            serve.post("/v1/release", {"dialog_id": did})
        assert run_cli("profile", "size", "trunk", GW[0], env=env).stdout == "0\n"
    finally:
        serve.stop()


@pytest.mark.parametrize("on_error", ["admit", "reject"])
def test_a_paused_redis_leaves_egress_to_on_store_error_and_no_ghost_gateway(
        on_error: str) -> None:
    """Redis paused during an attempt: the policy's on_store_error decides (admit: the
    call goes, uncounted); the request that reaches Redis after its caller gave up
    writes nothing, so afterwards every profile equals the calls up."""
    server = RedisServer().start()
    try:
        policy = build_policy("egr-fault", version=2, profiles={"total": {},
                                                                 "trunk": "gateway"},
                              limits={"trunk": 5}, on_store_error=on_error,
                              store_timeout="50ms")
        store = RedisStore(server.url, policy.namespace, timeout_ms=50)
        engine = Engine(policy, store, node="egr-fault")
        store.load(policy)
        d = engine.admit(call("5551000"))
        assert d.admitted
        server.signal(signal.SIGSTOP)
        try:
            r = engine.egress(d.dialog_id, GW[0])
            time.sleep(0.2)  # the attempt waits in Redis's socket, well past its deadline
        finally:
            server.signal(signal.SIGCONT)
        time.sleep(0.1)  # Redis reads it (and refuses it as late) before anything else
        assert (r.fallback, r.taken, r.known) == (True, on_error == "admit", False)
        if on_error == "reject":
            assert (r.code, r.reason) == (policy.reject.code, policy.reject.reason)
        engine.breaker.success()
        # the attempt Redis read late wrote nothing: the call up is counted, no gateway
        assert store.profile_size("total") == 1
        assert store.profile_values("trunk") == {}
        assert store.egress(d.dialog_id, GW[0]).taken  # the next attempt counts
        assert store.profile_values("trunk") == {GW[0]: 1}
        engine.release(d.dialog_id)
        assert store.profile_size("total") == 0 and store.profile_values("trunk") == {}
        store.close()
    finally:
        server.stop()
