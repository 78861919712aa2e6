"""Attempts recording (both stores) and ``policer replay`` (issue 10).

The recording runs on real Redis (and the in-process model for the contract);
time moves only through the stores' ``clock_offset_ms``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policer.call import Call
from policer.policy import Policy, parse_policy
from policer.replay import replay_store
from policer.store import Op, Store
from policer.store.keys import dialog_id
from policer.store.redis_store import RedisStore
from tests.support import call
from tests.support.cli import cli_json, run_cli
from tests.support.policies import (
    ACCOUNT,
    INTERNATIONAL,
    INTERNATIONAL_CLASSES,
    build_policy,
    policy_yaml,
    when,
)


def policy_text(namespace: str = "rp", total: int = 4, intl: int = 1, user: int = 2,
                **sections: Any) -> str:
    return policy_yaml(
        namespace, attributes=ACCOUNT,
        classes=INTERNATIONAL_CLASSES,
        profiles={"total": {}, "international": when("international"), "account": "account",
                  "user": "from_user"},
        limits={"total": total, "international": {"max": intl, "reject": INTERNATIONAL},
                "user": user},
        emergency={"class": "emergency", "bypass": True}, **sections)


def policy(namespace: str, total: int = 4, intl: int = 1, user: int = 2,
           **sections: Any) -> Policy:
    return parse_policy(policy_text(namespace, total, intl, user, **sections))


def jump(store: Store, ms: int) -> None:
    store.clock_offset_ms += ms  # type: ignore[attr-defined]


def acme(user: str, number: str = "5551234", call_id: str | None = None) -> Call:
    return call(number, user, headers={"X-Account": "acme"}, call_id=call_id)


# ----------------------------------------------------------------------------- the stream


def test_every_decided_attempt_is_recorded_once_with_what_a_policy_reads(store: Store) -> None:
    store.load(policy(store.namespace, user=1))
    before = store.now_ms()
    a = acme("alice", call_id="a-1")
    assert store.admit_call(a, "node-1").admitted
    assert store.admit_call(a, "node-1").duplicate  # a retransmission: no second attempt
    store.explain_call(acme("alice"))  # a dry run: nothing
    b = acme("alice", "00441632960123", call_id="b-1")
    rb = store.admit_call(b, "node-1")
    assert not rb.admitted and rb.limit == "user"
    store.apply([Op("record", "", call=acme("bob", call_id="c-1"), node="node-2")])
    after = store.now_ms()

    got = store.attempts()
    assert [x.info["call_id"] for x in got] == ["a-1", "b-1", "c-1"]
    first, second, third = got
    assert first.admitted and not first.recorded and first.code == 200
    assert first.dialog_id == dialog_id(a.call_id, a.from_tag)
    assert first.info["to"] == "5551234" and first.info["class"] == "local"
    assert first.info["node"] == "node-1" and first.info["from"] == "alice@example.net"
    assert first.attributes["header:x-account"] == "acme"
    assert first.attributes["from_user"] == "alice"
    assert first.attributes["ruri_user"] == "5551234"
    assert before <= first.time_ms <= after
    assert not second.admitted and second.code == 503
    assert (second.limit, second.kind) == ("user", "concurrent")
    assert second.info["class"] == "international"
    assert third.admitted and third.recorded
    # a range and paging
    assert [x.info["call_id"] for x in store.attempts(count=2)] == ["a-1", "b-1"]
    assert [x.info["call_id"] for x in store.attempts(after=first.record_id)] == ["b-1", "c-1"]
    assert store.attempts(since_ms=after + 60_000) == []


def test_attempts_keep_0_records_none(store: Store) -> None:
    store.load(policy(store.namespace, attempts={"keep": 0}))
    assert store.admit_call(acme("alice"), "n").admitted
    assert store.attempts() == []


# ----------------------------------------------------------------------------- replay


def record_mix(s: RedisStore) -> None:
    """Calls on the live store, one second apart (the test's clock):

    t0 A1 alice admitted; t1 its retransmission, B1 bob international admitted;
    t2 C1 carol international rejected (international 1/1); t3 A2 alice admitted;
    t4 A3 alice rejected (user 2/2); t5 A1, B1 answered; t6 B1 ends; t7 C2 carol
    international admitted; t8 D1 dave admitted (total 4/4), answered at t8.5;
    t9 E1 eve rejected (total); t10 A2 ends unanswered (cancel); t11 E2 eve admitted;
    t12 A1 ends. C2, D1, E2 are still live.
    """
    def at(t: float) -> None:
        s.clock_offset_ms = base + int(t * 1000)

    def admit(c: Call) -> bool:
        return s.admit_call(c, "node-1").admitted

    base = s.clock_offset_ms
    a1, a2, a3 = (acme("alice", call_id=f"A{i}") for i in (1, 2, 3))
    b1 = acme("bob", "00441632960123", call_id="B1")
    c1, c2 = (acme("carol", "00331234", call_id=f"C{i}") for i in (1, 2))
    d1 = acme("dave", call_id="D1")
    e1, e2 = (call("5550000", "eve", call_id=f"E{i}") for i in (1, 2))
    at(0)
    assert admit(a1)
    at(1)
    assert s.admit_call(a1, "node-1").duplicate
    assert admit(b1)
    at(2)
    assert not admit(c1)
    at(3)
    assert admit(a2)
    at(4)
    assert not admit(a3)
    at(5)
    s.apply([Op("confirm", dialog_id(a1.call_id, a1.from_tag)),
             Op("confirm", dialog_id(b1.call_id, b1.from_tag))])
    at(6)
    s.apply([Op("release", dialog_id(b1.call_id, b1.from_tag), "bye")])
    at(7)
    assert admit(c2)
    at(8)
    assert admit(d1)
    at(8.5)
    s.apply([Op("confirm", dialog_id(d1.call_id, d1.from_tag))])
    at(9)
    assert not admit(e1)
    at(10)
    s.apply([Op("release", dialog_id(a2.call_id, a2.from_tag), "cancel")])
    at(11)
    assert admit(e2)
    at(12)
    s.apply([Op("release", dialog_id(a1.call_id, a1.from_tag), "bye")])
    at(13)


def test_replay_under_the_same_policy_reproduces_the_actual_decisions(
        redis_store: RedisStore) -> None:
    live = policy(redis_store.namespace)
    redis_store.load(live)
    record_mix(redis_store)
    r = replay_store(live, redis_store).as_dict()
    assert r["changed"] == []
    assert r["attempts"] == 9
    assert (r["admitted"], r["rejected"]) == (6, 3)
    assert r["actual"] == {"admitted": 6, "rejected": 3}
    assert r["by_limit"] == {"international": 1, "user": 1, "total": 1}
    assert r["peak"]["total"] == 4
    assert r["peak"]["international"] == 1
    assert r["peak"]["user=alice"] == 2
    assert r["peak"]["account=acme"] == 4  # A1 A2 C2 D1 (B1 ended before C2)


def test_replay_under_a_tighter_policy_rejects_what_the_hand_computed_answer_says(
        redis_store: RedisStore, namespace: str) -> None:
    redis_store.load(policy(redis_store.namespace))
    record_mix(redis_store)
    # total 3, in another namespace: A1 B1 A2 fill it at t3; A3 now trips total (not
    # user); B1 ends at t6, C2 takes its slot at t7; D1 finds 3/3 and is rejected; E1
    # rejected as before; A2 ends at t10; E2 admitted
    r = replay_store(policy("candidate", total=3), redis_store).as_dict()
    assert r["attempts"] == 9
    assert (r["admitted"], r["rejected"]) == (5, 4)
    assert r["actual"] == {"admitted": 6, "rejected": 3}
    assert r["by_limit"] == {"total": 3, "international": 1}
    assert r["peak"]["total"] == 3
    changed = {c["call_id"]: c for c in r["changed"]}
    assert set(changed) == {"A3", "D1"}
    assert changed["A3"]["actual"] == {"admitted": False, "code": 503, "limit": "user",
                                       "kind": "concurrent"}
    assert changed["A3"]["candidate"]["limit"] == "total"
    assert changed["D1"]["actual"] == {"admitted": True}
    assert changed["D1"]["candidate"] == {"admitted": False, "code": 503, "limit": "total",
                                          "kind": "concurrent"}


def test_replay_under_a_looser_policy_admits_every_attempt(redis_store: RedisStore) -> None:
    redis_store.load(policy(redis_store.namespace))
    record_mix(redis_store)
    r = replay_store(policy("loose", total=10, intl=2, user=5), redis_store).as_dict()
    assert (r["admitted"], r["rejected"]) == (9, 0)
    assert {c["call_id"] for c in r["changed"]} == {"C1", "A3", "E1"}


def test_policer_replay_json(redis_url: str, namespace: str, tmp_path: Path) -> None:
    live = tmp_path / "live.yaml"
    live.write_text(policy_text(namespace, user=1))
    cand = tmp_path / "cand.yaml"
    cand.write_text(policy_text())
    s = RedisStore(redis_url, namespace)
    try:
        s.load(parse_policy(live.read_text()))
        assert s.admit_call(acme("alice", call_id="x1"), "n").admitted
        assert not s.admit_call(acme("alice", call_id="x2"), "n").admitted
    finally:
        s.close()
    env = {"POLICER_REDIS_URL": redis_url, "POLICER_POLICY": str(live)}
    r = cli_json("replay", "--policy", str(cand), "--since", "1h", env=env)
    assert list(r) == ["attempts", "admitted", "rejected", "by_limit", "actual", "peak",
                       "changed", "gateway_full", "fraud"]
    assert (r["attempts"], r["admitted"], r["rejected"]) == (2, 2, 0)
    assert r["actual"] == {"admitted": 1, "rejected": 1}
    assert [c["call_id"] for c in r["changed"]] == ["x2"]
    text = run_cli("replay", "--policy", str(cand), "--since", "1h", env=env, check=True).stdout
    assert "changed decisions: 1" in text
    assert "call-id=x2 actual=503 user (concurrent) candidate=admitted" in text
    bad = run_cli("replay", "--policy", str(cand), "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_replay_understands_directions_parents_and_gateways(redis_store: RedisStore) -> None:
    """A candidate with directions, a reseller level (the store's live parents) and a
    gateway cap, over calls the live policy admitted and sent to one gateway."""
    s = redis_store
    s.load(build_policy(s.namespace, version=2, attributes={"account": "header:X-Account"},
                        profiles={"total": {}, "customer": "account", "trunk": "gateway"}))
    s.parent_set("reseller", "acme", "r1")
    s.parent_set("reseller", "bolt", "r1")
    base = s.clock_offset_ms
    calls = [call("5551000", u, call_id=f"G{i}", source_ip=ip, headers={"X-Account": acct})
             for i, (u, acct, ip) in enumerate((("a", "acme", "192.0.2.5"),
                                                ("b", "bolt", "10.0.0.9"),
                                                ("c", "core", "192.0.2.6")))]
    for i, c in enumerate(calls):
        s.clock_offset_ms = base + i * 1000
        did = s.admit_call(c, "node-1").dialog_id
        assert s.egress(did, "gw1:5060").taken
    s.clock_offset_ms = base + 5000
    s.apply([Op("release", dialog_id(c.call_id, c.from_tag), "bye") for c in calls])
    s.clock_offset_ms = base + 6000
    candidate = build_policy(
        "cand", version=2, attributes={"account": "header:X-Account"},
        directions={"inbound": {"sources": ["192.0.2.0/24"]}, "outbound": {"default": True}},
        profiles={"inbound": {"when": {"direction": "inbound"}}, "customer": "account",
                  "reseller": {"value": {"parent": "customer"}}, "trunk": "gateway"},
        limits={"inbound": 1, "trunk": 1})
    r = replay_store(candidate, s).as_dict()
    assert (r["admitted"], r["rejected"]) == (2, 1)
    assert r["by_limit"] == {"inbound": 1}  # the third call came in from the trunks again
    assert r["peak"]["reseller=r1"] == 2  # acme and bolt, by the store's live parents
    assert r["peak"]["trunk=gw1:5060"] == 1
    assert r["gateway_full"] == {"trunk=gw1:5060": 1}  # bolt's call found it full


def test_a_candidate_fraud_rule_says_which_values_it_would_have_blocked_and_when(
        redis_store: RedisStore) -> None:
    """Yesterday's traffic had no fraud rules; the candidate's rule, run over the
    recorded attempts, names the user a sweep would have blocked, when, and until when;
    the calls it would then have refused are changed decisions."""
    live = policy(redis_store.namespace, total=100, intl=100, user=100)
    redis_store.load(live)
    base = redis_store.clock_offset_ms
    start = redis_store.now_ms()
    redis_store.clock_offset_ms = base + (3_600_000 - start % 3_600_000) + 60_000
    t0 = redis_store.now_ms()
    for i in range(6):
        redis_store.clock_offset_ms += 1000
        assert redis_store.admit_call(acme("mallory", f"0044163296{i:04d}"), "n1").admitted
    assert redis_store.admit_call(acme("alice", "00441632960000"), "n1").admitted
    candidate = policy(redis_store.namespace, total=100, intl=100, user=100, fraud=[{
        "name": "sweep", "key": "user", "when": {"class": "international"}, "per": "1h",
        "distinct_numbers": {"warning": 3, "critical": 5},
        "action": {"block": "30m"}}])
    r = replay_store(candidate, redis_store).as_dict()
    assert r["fraud"]["events"] == {"sweep|critical|distinct_numbers": 1,
                                    "sweep|warning|distinct_numbers": 1}
    [blocked] = r["fraud"]["blocked"]
    assert (blocked["rule"], blocked["key"], blocked["value"]) == ("sweep", "user", "mallory")
    assert abs(blocked["at"] - (t0 + 5000)) < 1000  # the fifth number
    assert blocked["until"] == blocked["at"] + 1_800_000
    # the crossing call and the one after it would have been refused
    assert len(r["changed"]) == 2
    assert (r["admitted"], r["rejected"]) == (5, 2)
    assert r["by_limit"] == {"sweep": 2}
