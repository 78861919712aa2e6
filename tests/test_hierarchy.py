"""Hierarchy: reseller -> customer -> user, where a call needs room at every level in
the same all-or-none decision. A level's value is the parent registered for the call's
value of the level below (live, shared through Redis, or from the file); a value with no
parent is skipped or rejected as the level says. On both stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policer.call import Call
from policer.engine import Engine
from policer.policy import Policy
from policer.snapshot import take_snapshot
from policer.store import RedisStore, Store
from policer.top import render
from tests.support import EngineFactory, call
from tests.support.cli import cli_json, log_events, run_cli
from tests.support.policies import build_policy, policy_errors, policy_yaml

ACCOUNT = {"account": "header:X-Account"}


def hierarchy_policy(*, parents: dict[str, Any] | None = None, on_missing: str = "skip",
                     limits: dict[str, Any] | None = None) -> Policy:
    return build_policy(
        "hier", version=2, attributes=ACCOUNT,
        profiles={"user": "from_user", "customer": "account",
                  "reseller": {"value": {"parent": "customer"},
                               "on_missing_parent": on_missing},
                  "group": {"value": {"parent": "reseller"}}},
        limits=limits if limits is not None else {
            "user": 5, "customer": 3, "reseller": {"max": 4, "reject": {
                "code": 486, "reason": "Reseller Busy"}}, "group": 5},
        **({"parents": parents} if parents else {}))


def by(user: str, account: str, **kw: Any) -> Call:
    return call("5551000", user, headers={"X-Account": account}, **kw)


def test_a_call_needs_room_at_every_level(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(hierarchy_policy())
    for acct in ("acme", "bolt", "core"):
        store.parent_set("reseller", acct, "r1")
    store.parent_set("group", "r1", "g1")
    d = e.admit(by("alice", "acme"))
    assert d.admitted
    assert d.memberships == ("user=alice", "customer=acme", "reseller=r1", "group=g1")
    # acme has room for 2 more, r1 for 3 more: r1 fills first across its customers
    got = [e.admit(by(u, a)).admitted for u, a in
           (("bob", "acme"), ("carol", "bolt"), ("dave", "core"), ("erin", "core"))]
    assert got == [True, True, True, False]
    full = e.admit(by("frank", "bolt"))
    assert (full.admitted, full.limit, full.code, full.reason, full.count, full.max) == (
        False, "reseller", 486, "Reseller Busy", 4, 4)
    # all or none: the rejected calls joined no level
    assert store.profile_size("reseller", "r1") == 4
    assert store.profile_size("group", "g1") == 4
    assert {a: store.profile_size("customer", a) for a in ("acme", "bolt", "core")} == {
        "acme": 2, "bolt": 1, "core": 1}


def test_a_live_parent_wins_and_moves_at_once(engine_for: EngineFactory,
                                              store: Store) -> None:
    e = engine_for(hierarchy_policy(parents={"reseller": {"acme": "file-r"}}))
    assert "reseller=file-r" in e.admit(by("a", "acme")).memberships
    assert store.parent_set("reseller", "acme", "live-r") is None
    # the very next call sees the live parent (no cached plan outlives a change)
    assert "reseller=live-r" in e.admit(by("a", "acme")).memberships
    assert store.parent_set("reseller", "acme", "other") == "live-r"
    assert "reseller=other" in e.admit(by("a", "acme")).memberships
    assert store.parent_unset("reseller", "acme") == "other"
    assert "reseller=file-r" in e.admit(by("a", "acme")).memberships
    assert store.parents("reseller") == {}
    store.parent_set("reseller", "bolt", "r2")
    assert store.parents("reseller") == {"bolt": "r2"}
    # calls up keep the parent they joined: their release leaves it
    assert store.profile_size("reseller", "live-r") == 1


def test_a_change_at_any_level_applies_from_the_next_call(engine_for: EngineFactory,
                                                          store: Store) -> None:
    """A customer's call after its reseller moved to another group joins that group;
    an unrelated change (another customer's parent) changes nothing of its call; the
    calls up keep the levels they joined."""
    e = engine_for(hierarchy_policy(limits={"customer": 10, "reseller": 10, "group": 10}))
    store.parent_set("reseller", "acme", "r1")
    store.parent_set("group", "r1", "g1")
    first = e.admit(by("alice", "acme"))
    assert first.memberships[2:] == ("reseller=r1", "group=g1")
    store.parent_set("group", "r1", "g2")  # two levels above the customer
    moved = e.admit(by("bob", "acme"))
    assert moved.memberships[2:] == ("reseller=r1", "group=g2")
    store.parent_set("reseller", "bolt", "r9")  # someone else's
    again = e.admit(by("carol", "acme"))
    assert again.memberships[2:] == ("reseller=r1", "group=g2")
    store.parent_unset("group", "r1")  # the group level is skipped now
    last = e.admit(by("dave", "acme"))
    assert last.admitted and last.memberships[2:] == ("reseller=r1",)
    assert (store.profile_size("group", "g1"), store.profile_size("group", "g2")) == (1, 2)
    assert store.profile_size("reseller", "r1") == 4


def test_live_state_an_older_policer_kept_still_counts_after_an_upgrade(
        redis_store: RedisStore) -> None:
    """An older policer kept live parents in the counts hash (``^level:value``) and a
    value's live caps in a field of their own (``R|``): the first load moves them where
    they are read now, so every customer keeps its reseller and its live max and rate,
    and a parent set since by this layout stands."""
    client, keys = redis_store.client, redis_store.keys
    client.hdel(keys.counts, "#layout")  # a namespace an older policer wrote
    client.hset(keys.counts, mapping={"^reseller:acme": "r-old", "^reseller:bolt": "r-b",
                                      "^group:r-old": "g1", "^": "0123abcd",
                                      "L|customer:acme": "5",
                                      "R|customer:acme": ",R=1:60000:1",
                                      "R|customer:bolt": ",R=1:60000:1"})
    client.hset(keys.parents, "reseller:bolt", "r-new")
    redis_store.load(hierarchy_policy())
    assert redis_store.parents("reseller") == {"acme": "r-old", "bolt": "r-new"}
    assert redis_store.parents("group") == {"r-old": "g1"}
    assert redis_store.limits("customer") == {"acme": 5}
    assert [f for f in map(str, client.hkeys(keys.counts)) if f[:1] in "^R"] == ["^"]
    e = Engine(hierarchy_policy(), redis_store)
    d = e.admit(by("alice", "acme"))
    assert d.memberships[2:] == ("reseller=r-old", "group=g1")
    assert redis_store.profile_size("group", "g1") == 1
    # the live rates still hold: one call a minute for acme and for bolt
    late = e.admit(by("bob", "acme"))
    assert (late.admitted, late.limit, late.kind) == (False, "customer", "rate")
    assert e.admit(by("carol", "bolt")).admitted
    assert not e.admit(by("dave", "bolt")).admitted
    # a second load finds this layout and moves nothing
    client.hset(keys.counts, "^reseller:core", "stray")
    redis_store.load(hierarchy_policy())
    assert redis_store.parents("reseller") == {"acme": "r-old", "bolt": "r-new"}


def test_an_unknown_parent_is_skipped_or_rejected(engine_for: EngineFactory,
                                                  store: Store) -> None:
    e = engine_for(hierarchy_policy())
    d = e.admit(by("alice", "orphan"))
    assert d.admitted and d.memberships == ("user=alice", "customer=orphan")
    strict = engine_for(hierarchy_policy(on_missing="reject"))
    r = strict.admit(by("alice", "orphan2", call_id="orphan-1"))
    assert (r.admitted, r.kind, r.limit, r.code, r.reason) == (
        False, "parent", "reseller", 486, "Reseller Busy")
    again = strict.admit(by("alice", "orphan2", call_id="orphan-1"))
    assert (again.duplicate, again.kind, again.code) == (True, "parent", 486)
    assert store.profile_size("customer", "orphan2") == 0
    # no account at all: nothing to look a parent up for, no level is joined
    assert strict.admit(call("5551000", "bob")).admitted
    # an emergency call passes whatever its hierarchy
    sos = engine_for(build_policy(
        "hier", version=2, attributes=ACCOUNT,
        classes={"emergency": {"numbers": ["112"]}, "other": {"default": True}},
        profiles={"customer": "account",
                  "reseller": {"value": {"parent": "customer"},
                               "on_missing_parent": "reject"}}))
    assert sos.admit(call("112", "x", headers={"X-Account": "nobody"})).admitted
    assert not sos.admit(call("5551000", "x", headers={"X-Account": "nobody"})).admitted


def test_explain_shows_every_level(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(hierarchy_policy())
    store.parent_set("reseller", "acme", "r1")
    x = e.explain(by("alice", "acme")).as_dict()
    assert [(r["profile"], r["value"], r["max"]) for r in x["limits"]] == [
        ("user", "alice", 5), ("customer", "acme", 3), ("reseller", "r1", 4)]


def test_hierarchy_errors_name_the_place(tmp_path: Path) -> None:
    assert policy_errors(tmp_path / "h.yaml", (
        "version: 2\nnamespace: x\n"
        "profiles:\n"
        "  total: {}\n"
        "  customer: {value: from_user}\n"
        "  a: {value: {parent: b}}\n"
        "  b: {value: {parent: a}}\n"
        "  c: {value: {parent: total}}\n"
        "  d: {value: {parent: custmer}}\n"
        "  e: {value: from_user, on_missing_parent: reject}\n"
        "  f: {value: {parent: customer}, on_missing_parent: drop}\n"
        "  g: {value: {parnet: customer}}\n"
        "parents:\n"
        "  customer: {x: y}\n"
        "  f: {acme: ''}\n")) == [
        "6:23: profiles.a.value.parent: a hierarchy without a root: 'a' is its own ancestor",
        "7:23: profiles.b.value.parent: a hierarchy without a root: 'b' is its own ancestor",
        "8:23: profiles.c.value.parent: profile 'total' has no value: a parent is "
        "registered per value of a valued profile",
        "9:23: profiles.d.value.parent: unknown profile 'custmer' (did you mean "
        "'customer'?)",
        "10:44: profiles.e.on_missing_parent: only a level of a hierarchy (value: {parent: "
        "PROFILE}) has parents",
        "11:53: profiles.f.on_missing_parent: must be one of skip, reject, got 'drop'",
        "12:14: profiles.g.value: expected an attribute, or {parent: PROFILE} (a level of a "
        "hierarchy)",
        "12:15: profiles.g.value.parnet: unknown key (did you mean 'parent'?)",
        "14:13: parents.customer: not a level of a hierarchy: give profiles.customer value: "
        "{parent: PROFILE}",
        "15:13: parents.f.acme: a parent is 1 to 4096 characters",
    ]


def test_parents_from_the_command_line_are_audited(tmp_path: Path,
                                                   env: dict[str, str]) -> None:
    path = tmp_path / "h.yaml"
    path.write_text(policy_yaml("hiercli", version=2, attributes=ACCOUNT,
                                profiles={"customer": "account",
                                          "reseller": {"value": {"parent": "customer"}}},
                                limits={"reseller": 1},
                                parents={"reseller": {"acme": "r-file"}}))
    base = ("--policy", str(path))
    proc = run_cli("parent", "set", "reseller", "acme", "r-live", *base, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reseller acme: - -> r-live"
    audit = [e for e in log_events(proc.stderr) if e.get("event") == "parent_changed"]
    assert (audit[0]["old"], audit[0]["new"], audit[0]["policy_default"]) == (
        None, "r-live", "r-file")
    run_cli("parent", "set", "reseller", "bolt", "r2", *base, env=env, check=True)
    assert cli_json("parent", "list", "reseller", *base, env=env)["parents"] == {
        "acme": {"parent": "r-live", "source": "live"},
        "bolt": {"parent": "r2", "source": "live"}}
    d = cli_json("admit", *base, "--to", "1", "--header", "X-Account: acme", env=env)
    assert "reseller=r-live" in d["memberships"]
    gone = cli_json("parent", "unset", "reseller", "acme", *base, env=env)
    assert (gone["old"], gone["new"], gone["policy_default"]) == ("r-live", None, "r-file")
    listed = cli_json("parent", "list", "reseller", *base, env=env)["parents"]
    assert listed["acme"] == {"parent": "r-file", "source": "policy"}
    bad = run_cli("parent", "set", "customer", "acme", "x", *base, env=env)
    assert bad.returncode != 0 and "not a level of a hierarchy" in bad.stderr


def test_top_shows_customers_under_their_reseller_and_every_gateway(
        engine_for: EngineFactory, store: Store) -> None:
    policy = build_policy(
        "hier", version=2, attributes=ACCOUNT,
        profiles={"customer": "account", "reseller": {"value": {"parent": "customer"}},
                  "trunk": "gateway"},
        limits={"reseller": 10, "trunk": {"values": {"gw-idle:5060": {"max": 2}}}},
        parents={"reseller": {"acme": "r1", "bolt": "r2"}})
    e = engine_for(policy)
    store.parent_set("reseller", "core", "r1")
    for acct in ("acme", "acme", "core", "bolt"):
        d = e.admit(by("u", acct))
        assert d.admitted
    for i, gw in enumerate(("gw-a:5060", "gw-b:5060", "gw-c:5060")):
        store.egress(e.admit(by(f"g{i}", "acme")).dialog_id, gw)
    snap = take_snapshot(policy, store, top=1)
    assert snap.parents["reseller"].get("acme") == "r1"
    frame = render(policy, snap).splitlines()
    names = [line.split()[0] for line in frame if line.startswith("  ")]
    r1 = names.index("reseller=r1")
    assert names[r1 + 1] == "customer=acme"  # the busiest customer, under its reseller
    # every gateway has a row (few values: no top-N cut), also one with no calls yet
    assert {"trunk=gw-a:5060", "trunk=gw-b:5060", "trunk=gw-c:5060",
            "trunk=gw-idle:5060"} <= set(names)


def test_the_files_parents_share_the_librarys_bound_with_the_classes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from policer.policy import sections

    monkeypatch.setattr(sections, "MAX_CLASS_ENTRIES", 3)
    assert policy_errors(tmp_path / "big.yaml", (
        "version: 2\nnamespace: x\nclasses: {a: {numbers: ['1', '2']}}\n"
        "profiles:\n  customer: {value: from_user}\n"
        "  reseller: {value: {parent: customer}}\n"
        "parents:\n  reseller: {u1: r1, u2: r1}\n")) == [
        "8:3: parents: 2 parents and 2 numbers and prefixes in all, more than the 3 a "
        "policy library holds (register parents with policer parent set instead)"]
