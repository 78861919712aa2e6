"""Limits of single values in the policy file (``limits.PROFILE.values``): a carrier
gateway, a reseller or a big customer gets its own cap, rate and answer without a live
limit, on both stores; a live limit still wins."""

from __future__ import annotations

from pathlib import Path

from policer.call import Call
from policer.policy import Policy, Rate
from policer.store import Store
from tests.support import EngineFactory, call
from tests.support.policies import build_policy, policy_errors

TRUNK = {"trunk": "header:X-Trunk"}


def trunk_policy(limit: object) -> Policy:
    return build_policy("vals", version=2, attributes=TRUNK,
                        profiles={"trunk": "trunk", "total": {}},
                        limits={"trunk": limit})


def via(trunk: str, **kw: str) -> Call:
    return call("5551000", headers={"X-Trunk": trunk}, **kw)


def test_a_value_with_its_own_limit_is_capped_by_it(engine_for: EngineFactory,
                                                      store: Store) -> None:
    e = engine_for(trunk_policy({"max": 3, "values": {
        "gw1": {"max": 1, "reject": {"code": 480, "reason": "Gateway Full"}},
        "gw2": {"max": 2}}}))
    assert e.admit(via("gw1")).admitted
    full = e.admit(via("gw1", call_id="gw1-second"))
    assert (full.admitted, full.code, full.reason, full.limit, full.count, full.max) == (
        False, 480, "Gateway Full", "trunk", 1, 1)
    # the same INVITE again gets the same answer (the value's entry, not the profile's)
    again = e.admit(via("gw1", call_id="gw1-second"))
    assert (again.duplicate, again.code, again.reason) == (True, 480, "Gateway Full")
    assert [e.admit(via("gw2")).admitted for _ in range(3)] == [True, True, False]
    # any other value has the profile's limit
    assert [e.admit(via("gw9")).admitted for _ in range(4)] == [True, True, True, False]
    assert {v: store.profile_size("trunk", v) for v in ("gw1", "gw2", "gw9")} == {
        "gw1": 1, "gw2": 2, "gw9": 3}
    assert store.profile_size("total") == 6


def test_values_alone_leave_other_values_unlimited(engine_for: EngineFactory) -> None:
    e = engine_for(trunk_policy({"values": {"gw1": {"max": 1}}}))
    assert [e.admit(via("gw1")).admitted for _ in range(2)] == [True, False]
    assert all(e.admit(via("other")).admitted for _ in range(5))


def test_a_live_limit_wins_over_the_files_value(engine_for: EngineFactory,
                                                store: Store) -> None:
    e = engine_for(trunk_policy({"max": 10, "values": {"gw1": {"max": 1}}}))
    store.limit_set("trunk", "gw1", 2)
    assert [e.admit(via("gw1")).admitted for _ in range(3)] == [True, True, False]
    store.limit_unset("trunk", "gw1")
    assert not e.admit(via("gw1")).admitted  # back to the file's 1 (2 are up)


def test_a_live_limit_changed_after_a_values_calls_applies_from_its_next_call(
        engine_for: EngineFactory, store: Store) -> None:
    """A value that has called (its plan kept, with its live limits as they were) gets a
    live max, a live rate, then neither, each from its very next call; another value's
    change leaves it as it is."""
    e = engine_for(trunk_policy({"max": 10}))
    assert all(e.admit(via("gw1")).admitted for _ in range(2))
    store.limit_set("trunk", "gw1", 3)
    assert [e.admit(via("gw1")).admitted for _ in range(2)] == [True, False]
    store.limit_set("trunk", "gw2", 1)  # someone else's
    assert not e.admit(via("gw1")).admitted
    store.rate_limit_set("trunk", "gw1", Rate(1, 60_000, 1))
    store.limit_unset("trunk", "gw1")
    got = [e.admit(via("gw1")) for _ in range(2)]
    assert [d.admitted for d in got] == [True, False]
    assert (got[1].kind, got[1].limit) == ("rate", "trunk")
    store.rate_limit_set("trunk", "gw1", None)
    assert e.admit(via("gw1")).admitted
    assert store.profile_size("trunk", "gw1") == 5


def test_a_value_may_have_a_rate_of_its_own(engine_for: EngineFactory) -> None:
    e = engine_for(trunk_policy({"max": 100, "values": {
        "gw1": {"rate": {"max": 2, "per": "1s", "burst": 2}}}}))
    got = [e.admit(via("gw1")) for _ in range(3)]
    assert [d.admitted for d in got] == [True, True, False]
    assert (got[2].kind, got[2].limit) == ("rate", "trunk")
    assert all(e.admit(via("gw2")).admitted for _ in range(5))  # no rate for the others


def test_explain_shows_the_values_max(engine_for: EngineFactory) -> None:
    e = engine_for(trunk_policy({"max": 10, "values": {"gw1": {"max": 4}}}))
    rows = {r["profile"]: r for r in e.explain(via("gw1")).as_dict()["limits"]}
    assert rows["trunk"]["max"] == 4


def test_value_limit_errors_name_the_place(tmp_path: Path) -> None:
    assert policy_errors(tmp_path / "v.yaml", (
        "version: 2\nnamespace: x\n"
        "profiles:\n  total: {}\n  trunk: {value: header:X-Trunk}\n"
        "limits:\n"
        "  total: {max: 5, values: {a: {max: 1}}}\n"
        "  trunk:\n"
        "    max: 3\n"
        "    values:\n"
        "      gw1: {max: -1}\n"
        "      gw2: {rate: {max: 2, per: 1s}, rate_rejct: {code: 429}}\n"
        "      gw3: []\n")) == [
        "7:27: limits.total.values: limits of single values need a valued profile "
        "(profiles.total.value)",
        "11:18: limits.trunk.values.gw1.max: must be between 0 and 10000000, got -1",
        "12:38: limits.trunk.values.gw2.rate_rejct: unknown key (did you mean "
        "'rate_reject'?)",
        "13:12: limits.trunk.values.gw3: a list of limits needs at least one entry",
    ]


def test_a_values_answer_is_the_profiles_unless_it_gives_its_own(
        engine_for: EngineFactory) -> None:
    e = engine_for(trunk_policy({"max": 5, "reject": {"code": 480, "reason": "Trunk Busy"},
                                 "values": {"gw1": {"max": 0},
                                            "gw2": {"max": 0, "reject": {"code": 486}}}}))
    assert (e.admit(via("gw1")).code, e.admit(via("gw1")).reason) == (480, "Trunk Busy")
    assert e.admit(via("gw2")).code == 486
