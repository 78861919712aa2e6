"""The store contract, run unchanged against the Redis store and the in-process
store (the ``store`` fixture is parametrized over both).

Time is moved with the stores' ``clock_offset_ms`` testing aid, so deadlines
are exercised without sleeping.
"""

from __future__ import annotations

import pytest

from policer.store import AdmitRequest, Member, Store
from policer.store.base import STATS_FIELDS
from tests.support.explicit import ExplicitStore

EARLY = 10_000  # ms
DIALOG = 100_000  # ms


def req(did: str, *members: Member, early_ms: int = EARLY, emergency: bool = False,
        bypass: bool = False, info: dict[str, str] | None = None) -> AdmitRequest:
    return AdmitRequest(did, members, early_ms, emergency=emergency or bypass,
                        emergency_bypass=bypass, info=info or {})


def jump(store: Store, ms: int) -> None:
    store.clock_offset_ms += ms  # type: ignore[attr-defined]


TOTAL3 = Member("total", max=3)


# ----------------------------------------------------------------------------- limits


def test_admits_up_to_the_limit_then_rejects(store: ExplicitStore) -> None:
    for i in range(3):
        r = store.admit(req(f"d{i}", TOTAL3))
        assert r.admitted and not r.duplicate and r.tripped == -1
        assert store.profile_size("total") == i + 1
    r = store.admit(req("d3", TOTAL3))
    assert not r.admitted
    assert (r.tripped, r.count, r.max) == (0, 3, 3)
    assert not r.bypass and not r.duplicate
    assert store.profile_size("total") == 3


def test_release_frees_a_slot(store: ExplicitStore) -> None:
    for i in range(3):
        assert store.admit(req(f"d{i}", TOTAL3)).admitted
    assert store.release("d1", "bye") is not None
    assert store.profile_size("total") == 2
    assert store.admit(req("d4", TOTAL3)).admitted
    assert not store.admit(req("d5", TOTAL3)).admitted


def test_the_tripped_member_is_the_one_whose_limit_is_reached(store: ExplicitStore) -> None:
    total = Member("total", max=10)
    alice = Member("user", "alice", max=1)
    assert store.admit(req("d1", total, alice)).admitted
    r = store.admit(req("d2", total, alice))
    assert not r.admitted
    assert (r.tripped, r.count, r.max) == (1, 1, 1)


def test_all_or_nothing_a_call_rejected_by_its_second_profile_joins_none(
        store: ExplicitStore) -> None:
    total = Member("total", max=10)
    intl = Member("international", max=1)
    counted = Member("class")  # counted only, no limit
    assert store.admit(req("d1", total, intl, counted)).admitted
    r = store.admit(req("d2", total, intl, counted))
    assert not r.admitted and r.tripped == 1
    assert store.profile_size("total") == 1
    assert store.profile_size("international") == 1
    assert store.profile_size("class") == 1
    assert store.stats()["active"] == 1
    assert store.dialog("d2") is None


def test_a_profile_without_a_limit_only_counts(store: ExplicitStore) -> None:
    for i in range(50):
        assert store.admit(req(f"d{i}", Member("local"))).admitted
    assert store.profile_size("local") == 50


def test_a_limit_of_zero_rejects_everything(store: ExplicitStore) -> None:
    r = store.admit(req("d1", Member("blocked", max=0)))
    assert not r.admitted and (r.tripped, r.count, r.max) == (0, 0, 0)


def test_valued_profiles_count_per_value(store: ExplicitStore) -> None:
    for v in ("alice", "alice", "bob"):
        assert store.admit(req(f"d-{v}-{store.profile_size('user', v)}",
                               Member("user", v, max=2))).admitted
    assert store.profile_size("user", "alice") == 2
    assert store.profile_size("user", "bob") == 1
    assert store.profile_size("user", "carol") == 0
    assert not store.admit(req("d-alice-x", Member("user", "alice", max=2))).admitted
    assert store.admit(req("d-bob-x", Member("user", "bob", max=2))).admitted


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_admit_returns_the_earlier_decision_and_counts_once(store: ExplicitStore) -> None:
    first = store.admit(req("d1", TOTAL3, Member("user", "alice")))
    again = store.admit(req("d1", TOTAL3, Member("user", "alice")))
    assert first.admitted and not first.duplicate
    assert again.admitted and again.duplicate
    assert store.profile_size("total") == 1
    assert store.profile_size("user", "alice") == 1
    s = store.stats()
    assert s["processed"] == 1 and s["active"] == 1
    assert store.decisions() == {("admitted", "total"): 1, ("admitted", "user"): 1}


def test_duplicate_of_a_rejected_dialog_stays_rejected_and_counts_once(
        store: ExplicitStore) -> None:
    one = Member("total", max=1)
    assert store.admit(req("d1", one)).admitted
    first = store.admit(req("d2", one))
    assert not first.admitted
    store.release("d1", "bye")
    # the INVITE re-sent with credentials: the same answer, even though a slot is free now
    again = store.admit(req("d2", one))
    assert not again.admitted and again.duplicate
    assert (again.tripped, again.count, again.max) == (first.tripped, first.count, first.max)
    assert store.profile_size("total") == 0
    assert store.stats()["rejected"] == 1
    assert store.decisions()[("rejected", "total")] == 1


def test_duplicate_of_a_bypassed_emergency_call_keeps_its_flags(store: ExplicitStore) -> None:
    one = Member("total", max=1)
    assert store.admit(req("d1", one)).admitted
    first = store.admit(req("sos", one, bypass=True))
    again = store.admit(req("sos", one, bypass=True))
    assert first.bypass and again.bypass and again.duplicate and again.admitted
    assert store.profile_size("total") == 2
    assert store.stats()["bypassed"] == 1


# ----------------------------------------------------------------------------- events


def test_confirm_refresh_release_of_unknown_ids_are_harmless(store: ExplicitStore) -> None:
    assert store.confirm("nope", DIALOG) is False
    assert store.refresh("nope", DIALOG) is False
    assert store.release("nope", "bye") is None
    assert store.dialog("nope") is None
    assert store.stats()["ended"] == 0
    assert store.call_records() == []


def test_release_is_idempotent(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    assert store.confirm("d1", DIALOG)
    rec = store.release("d1", "bye")
    assert rec is not None and rec.dialog_id == "d1"
    assert store.release("d1", "bye") is None
    assert store.release("d1", "timeout") is None
    assert store.profile_size("total") == 0
    assert store.stats()["ended"] == 1
    assert store.ended() == {"bye": 1}
    assert len(store.call_records()) == 1


def test_events_after_release_do_not_revive_the_dialog(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    store.release("d1", "cancel")
    assert store.confirm("d1", DIALOG) is False
    assert store.refresh("d1", DIALOG) is False
    assert store.set_var("d1", "x", "1") is False
    assert store.profile_size("total") == 0
    assert store.stats()["active"] == 0


def test_release_of_a_rejected_dialog_is_not_a_call_end(store: ExplicitStore) -> None:
    zero = Member("total", max=0)
    assert not store.admit(req("d1", zero)).admitted
    assert store.release("d1", "failed") is None
    assert store.confirm("d1", DIALOG) is False
    assert store.stats()["ended"] == 0
    assert store.call_records() == []


def test_dialog_states(store: ExplicitStore) -> None:
    info = {"call_id": "c1@x", "from": "alice@example.net", "to": "0301234", "node": "n1"}
    assert store.admit(req("d1", TOTAL3, Member("user", "alice"), info=info)).admitted
    d = store.dialog("d1")
    assert d is not None
    assert d.state == "early" and d.start_ms == 0 and d.end_ms == 0
    assert d.deadline_ms == d.init_ms + EARLY
    assert d.profiles == ("total", "user=alice")
    assert dict(d.info) == info
    assert store.confirm("d1", DIALOG)
    d = store.dialog("d1")
    assert d is not None and d.state == "confirmed"
    assert d.start_ms >= d.init_ms and d.deadline_ms == d.start_ms + DIALOG
    store.release("d1", "bye")
    d = store.dialog("d1")
    assert d is not None and d.state == "ended" and d.end_reason == "bye" and d.end_ms > 0


def test_a_rejected_dialog_is_no_dialog(store: ExplicitStore) -> None:
    assert not store.admit(req("d1", Member("total", max=0))).admitted
    assert store.dialog("d1") is None


# ----------------------------------------------------------------------------- deadlines


def test_an_unanswered_dialog_stops_counting_at_its_early_deadline(store: ExplicitStore) -> None:
    """Past its deadline a dialog counts until a node's tick ends it (once a second in
    every node: a second at most), never longer."""
    one = Member("total", max=1)
    assert store.admit(req("d1", one)).admitted
    jump(store, EARLY - 2_000)
    assert store.profile_size("total") == 1
    assert not store.admit(req("d2", one)).admitted
    jump(store, 2_001)
    assert store.stats()["expired"] == 0  # not ended yet: a node's tick ends it
    assert store.tick("proxy-1", 0, False)[:3] == (0, 0, 1)
    assert store.profile_size("total") == 0
    assert store.stats()["active"] == 0
    assert store.admit(req("d3", one)).admitted  # the slot is free again
    assert store.stats()["expired"] == 1
    assert store.ended().get("expired") == 1


def test_confirm_moves_the_early_deadline_to_the_dialog_deadline(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    jump(store, EARLY // 2)
    assert store.confirm("d1", DIALOG)
    jump(store, EARLY)  # past the early deadline
    assert store.profile_size("total") == 1
    s = store.stats()
    assert (s["early"], s["confirmed"], s["active"]) == (0, 1, 1)
    jump(store, DIALOG - EARLY - 2_000)  # 2 s before the dialog deadline
    store.tick("proxy-1", 0, False)
    assert store.profile_size("total") == 1
    jump(store, 2_001)
    store.tick("proxy-1", 0, False)
    assert store.profile_size("total") == 0
    assert store.stats()["active"] == 0


def test_refresh_pushes_the_deadline_on(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    assert store.confirm("d1", DIALOG)
    jump(store, DIALOG - 1_000)
    assert store.refresh("d1", DIALOG)
    jump(store, DIALOG - 1_000)
    store.tick("proxy-1", 0, False)
    assert store.profile_size("total") == 1
    assert store.stats()["confirmed"] == 1
    jump(store, 1_001)
    store.tick("proxy-1", 0, False)
    assert store.profile_size("total") == 0
    assert store.stats()["confirmed"] == 0


def test_refresh_of_an_early_dialog_keeps_it_early(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    assert store.refresh("d1", DIALOG)
    jump(store, EARLY + 1)
    assert store.profile_size("total") == 1
    s = store.stats()
    assert (s["early"], s["confirmed"]) == (1, 0)
    d = store.dialog("d1")
    assert d is not None and d.state == "early"


def test_a_dialog_past_its_deadline_is_gone_for_good(store: ExplicitStore) -> None:
    """A late 200 OK or refresh must not bring back a dialog that stopped counting:
    its slot may have been given to another call meanwhile."""
    one = Member("total", max=1)
    assert store.admit(req("d1", one)).admitted
    jump(store, EARLY + 1)
    assert store.confirm("d1", DIALOG) is False  # past its deadline: not revived
    store.tick("proxy-1", 0, False)  # ... and ended by the next sweep
    assert store.admit(req("d2", one)).admitted  # took the freed slot
    assert store.confirm("d1", DIALOG) is False
    assert store.refresh("d1", DIALOG) is False
    assert store.profile_size("total") == 1  # never 2 > max


def test_expired_dialogs_leave_every_profile(store: ExplicitStore) -> None:
    members = (Member("total", max=100), Member("user", "alice", max=100), Member("local"))
    for i in range(20):
        assert store.admit(req(f"d{i}", *members)).admitted
    for i in range(5):
        assert store.confirm(f"d{i}", DIALOG)
    jump(store, EARLY + 1)
    store.tick("proxy-1", 0, False)
    assert store.profile_size("total") == 5
    assert store.profile_size("user", "alice") == 5
    assert store.profile_values("user") == {"alice": 5}
    assert len(store.profile_list("local")) == 5
    jump(store, DIALOG)
    store.tick("proxy-1", 0, False)
    assert store.profile_size("total") == 0
    assert store.profile_values("user") == {}
    assert store.profile_list("local") == []
    assert store.stats()["active"] == 0


# ----------------------------------------------------------------------------- emergency


def test_ordinary_calls_stop_at_max_minus_reserve(store: ExplicitStore) -> None:
    total = Member("total", max=5, reserve=2)
    for i in range(3):
        assert store.admit(req(f"d{i}", total)).admitted
    r = store.admit(req("d3", total))
    assert not r.admitted and (r.tripped, r.count, r.max) == (0, 3, 3)


def test_emergency_calls_may_use_the_reserve(store: ExplicitStore) -> None:
    total = Member("total", max=5, reserve=2)
    for i in range(3):
        assert store.admit(req(f"d{i}", total)).admitted
    assert store.admit(req("sos1", total, emergency=True)).admitted
    assert store.admit(req("sos2", total, emergency=True)).admitted
    r = store.admit(req("sos3", total, emergency=True))  # no bypass: the max holds
    assert not r.admitted and (r.count, r.max) == (5, 5)
    assert not store.admit(req("d4", total)).admitted
    assert store.profile_size("total") == 5


def test_emergency_bypass_admits_over_the_limit_and_still_counts(store: ExplicitStore) -> None:
    total = Member("total", max=2)
    emerg = Member("emergency")
    for i in range(2):
        assert store.admit(req(f"d{i}", total)).admitted
    r = store.admit(req("sos", total, emerg, bypass=True))
    assert r.admitted and r.bypass
    assert (r.tripped, r.count, r.max) == (0, 2, 2)
    assert store.profile_size("total") == 3
    assert store.profile_size("emergency") == 1
    s = store.stats()
    assert s["bypassed"] == 1 and s["processed"] == 3
    assert store.decisions()[("bypassed", "total")] == 1
    assert store.decisions()[("admitted", "emergency")] == 1
    # still counted: ordinary calls are turned away until it ends
    assert not store.admit(req("d2", total)).admitted
    store.release("sos", "bye")
    store.release("d0", "bye")
    assert store.admit(req("d3", total)).admitted


def test_emergency_under_the_limit_is_no_bypass(store: ExplicitStore) -> None:
    r = store.admit(req("sos", Member("total", max=2), bypass=True))
    assert r.admitted and not r.bypass and r.tripped == -1
    assert store.stats()["bypassed"] == 0


# ----------------------------------------------------------------------------- shadow


def test_shadow_limits_admit_and_report(store: ExplicitStore) -> None:
    shadow = Member("trial", max=1, shadow=True)
    total = Member("total", max=10)
    first = store.admit(req("d1", total, shadow))
    assert first.admitted and first.shadow == -1
    r = store.admit(req("d2", total, shadow))
    assert r.admitted and not r.bypass
    assert r.shadow == 1 and r.tripped == -1
    assert (r.count, r.max) == (1, 1)
    assert store.profile_size("trial") == 2
    assert store.stats()["shadow_rejected"] == 1
    assert store.decisions()[("shadow_rejected", "trial")] == 1
    assert store.decisions()[("admitted", "total")] == 2


def test_a_real_limit_still_rejects_next_to_a_shadow_one(store: ExplicitStore) -> None:
    shadow = Member("trial", max=0, shadow=True)
    total = Member("total", max=1)
    assert store.admit(req("d1", shadow, total)).admitted
    r = store.admit(req("d2", shadow, total))
    assert not r.admitted and r.tripped == 1 and r.shadow == 0
    assert store.profile_size("trial") == 1


# ----------------------------------------------------------------------------- live limits


def test_live_limits_set_get_unset(store: ExplicitStore) -> None:
    assert store.limit_get("account", "acme") is None
    assert store.limit_set("account", "acme", 3) is None
    assert store.limit_set("account", "acme", 4) == 3
    assert store.limit_get("account", "acme") == 4
    assert store.limit_set("account", "other", 1) is None
    assert store.limits("account") == {"acme": 4, "other": 1}
    assert store.limits("user") == {}
    assert store.limit_unset("account", "acme") == 4
    assert store.limit_unset("account", "acme") is None
    assert store.limit_get("account", "acme") is None
    assert store.limits("account") == {"other": 1}


def test_a_live_limit_overrides_the_members_max_for_that_value_only(store: ExplicitStore) -> None:
    def acme(i: int) -> AdmitRequest:
        return req(f"a{i}", Member("account", "acme", max=1))

    assert store.admit(acme(0)).admitted
    assert not store.admit(acme(1)).admitted
    store.limit_set("account", "acme", 3)
    assert store.admit(acme(2)).admitted
    assert store.admit(acme(3)).admitted
    r = store.admit(acme(4))
    assert not r.admitted and (r.count, r.max) == (3, 3)
    # another value keeps the default
    assert store.admit(req("b0", Member("account", "beta", max=1))).admitted
    assert not store.admit(req("b1", Member("account", "beta", max=1))).admitted
    # lowered below the current count: no new call until enough end
    store.limit_set("account", "acme", 1)
    assert not store.admit(acme(5)).admitted
    store.limit_unset("account", "acme")
    assert not store.admit(acme(6)).admitted
    for i in (0, 2, 3):
        store.release(f"a{i}", "bye")
    assert store.admit(acme(7)).admitted


def test_a_live_limit_can_open_an_uncapped_profile_value(store: ExplicitStore) -> None:
    store.limit_set("user", "bob", 1)
    assert store.admit(req("d1", Member("user", "bob"))).admitted
    r = store.admit(req("d2", Member("user", "bob")))
    assert not r.admitted and r.max == 1


def test_live_limits_take_awkward_values(store: ExplicitStore) -> None:
    value = "a:b {c} d\r\n%20é"
    store.limit_set("account", value, 0)
    assert store.limit_get("account", value) == 0
    assert store.limit_get("account", "a:b {c} d") is None
    assert store.limits("account") == {value: 0}
    assert not store.admit(req("d1", Member("account", value, max=5))).admitted
    assert store.admit(req("d2", Member("account", "a:b {c} d", max=5))).admitted


# ----------------------------------------------------------------------------- variables


def test_dialog_variables(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    assert store.get_var("d1", "x") is None
    assert store.set_var("d1", "x", "1")
    assert store.set_var("d1", "x", "2")
    assert store.set_var("d1", "caller name", "Zoë: {vip}\n")
    assert store.get_var("d1", "x") == "2"
    assert store.get_var("d1", "caller name") == "Zoë: {vip}\n"
    assert store.confirm("d1", DIALOG)
    assert store.get_var("d1", "x") == "2"  # kept for the whole dialog
    d = store.dialog("d1")
    assert d is not None and dict(d.variables) == {"x": "2", "caller name": "Zoë: {vip}\n"}
    rec = store.release("d1", "bye")
    assert rec is not None and dict(rec.variables) == dict(d.variables)
    assert store.set_var("d1", "x", "3") is False


def test_variables_are_kept_as_valid_utf8(store: ExplicitStore) -> None:
    from policer.call import text

    assert store.admit(req("d1", TOTAL3, info={"call_id": text(b"c\xff1")})).admitted
    assert store.set_var("d1", text(b"n\xfe"), text(b"v\xff\x00"))
    assert store.get_var("d1", "n\ufffd") == "v\ufffd\x00"
    rec = store.release("d1", "bye")
    assert rec is not None and rec.call_id == text(b"c\xff1")  # kept as sent
    assert dict(rec.variables) == {"n\ufffd": "v\ufffd\x00"}


def test_variables_of_unknown_or_rejected_dialogs(store: ExplicitStore) -> None:
    assert store.set_var("nope", "x", "1") is False
    assert store.get_var("nope", "x") is None
    assert not store.admit(req("d1", Member("total", max=0))).admitted
    assert store.set_var("d1", "x", "1") is False
    assert store.get_var("d1", "x") is None


# ----------------------------------------------------------------------------- counters


def test_stats_counters(store: ExplicitStore) -> None:
    one = Member("total", max=3)
    for i in range(3):
        assert store.admit(req(f"d{i}", one)).admitted
    assert not store.admit(req("d3", one)).admitted
    assert store.confirm("d0", DIALOG)
    s = store.stats()
    assert set(s) == set(STATS_FIELDS)
    assert (s["active"], s["early"], s["confirmed"]) == (3, 2, 1)
    assert (s["processed"], s["rejected"]) == (3, 1)
    store.release("d0", "bye")
    store.release("d1", "cancel")
    store.release("d2", "failed")
    s = store.stats()
    assert (s["active"], s["early"], s["confirmed"]) == (0, 0, 0)
    assert (s["ended"], s["failed"], s["expired"]) == (3, 2, 0)
    assert store.ended() == {"bye": 1, "cancel": 1, "failed": 1}


def test_decisions_count_per_result_and_profile(store: ExplicitStore) -> None:
    total = Member("total", max=2)
    for i in range(2):
        assert store.admit(req(f"d{i}", total, Member("user", "u"))).admitted
    for i in range(2, 5):
        assert not store.admit(req(f"d{i}", total, Member("user", "u"))).admitted
    assert store.decisions() == {
        ("admitted", "total"): 2,
        ("admitted", "user"): 2,
        ("rejected", "total"): 3,
    }


def test_expired_dialogs_are_counted_as_expired(store: ExplicitStore) -> None:
    for i in range(4):
        assert store.admit(req(f"d{i}", TOTAL3 if i < 3 else Member("x"))).admitted
    store.release("d3", "bye")
    jump(store, EARLY + 1)
    assert not store.admit(req("d9", TOTAL3)).admitted  # they count until a tick ends them
    assert store.stats()["expired"] == 0
    # a node's tick ends them (never an INVITE's decision), each with a call record
    assert store.tick("proxy-1", 0, False)[2] == 3
    assert store.admit(req("d10", TOTAL3)).admitted
    assert store.stats()["expired"] == 3
    assert store.ended() == {"bye": 1, "expired": 3}
    assert [r.reason for r in store.call_records()] == ["bye", "expired", "expired", "expired"]
    assert store.tick("proxy-1", 0, False)[2] == 0  # each ends once


# ----------------------------------------------------------------------------- call records


def test_one_call_record_per_dialog(store: ExplicitStore) -> None:
    info = {"call_id": "c1@host", "from": "alice@example.net", "to": "0049301234",
            "node": "proxy-1"}
    assert store.admit(req("d1", TOTAL3, Member("user", "alice"), info=info)).admitted
    assert store.set_var("d1", "account", "acme")
    rec = store.release("d1", "cancel")
    assert store.release("d1", "bye") is None
    records = store.call_records()
    assert records == [rec]
    assert rec is not None
    assert rec.call_id == "c1@host" and rec.from_uri == "alice@example.net"
    assert rec.to_uri == "0049301234" and rec.node == "proxy-1"
    assert rec.reason == "cancel" and rec.answer_ms == 0 and rec.bill_sec == 0
    assert rec.profiles == ("total", "user=alice")
    assert dict(rec.variables) == {"account": "acme"}
    assert rec.as_dict()["AnswerTime"] is None


def test_bill_sec_of_a_confirmed_call(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    jump(store, 2_000)
    assert store.confirm("d1", DIALOG)
    jump(store, 61_000)
    rec = store.release("d1", "bye")
    assert rec is not None
    assert rec.setup_ms + 2_000 <= rec.answer_ms < rec.end_ms
    assert rec.end_ms - rec.answer_ms >= 61_000
    assert rec.bill_sec in (61, 62)  # rounded to the second; 62 only on a stalled machine
    d = rec.as_dict()
    assert d["BillSec"] == rec.bill_sec and d["Reason"] == "bye"
    assert d["AnswerTime"] == rec.answer_ms / 1000


def test_call_records_page_in_order(store: ExplicitStore) -> None:
    for i in range(5):
        assert store.admit(req(f"d{i}", Member("x"))).admitted
    for i in range(5):
        store.release(f"d{i}", "bye")
    records = store.call_records()
    assert [r.dialog_id for r in records] == [f"d{i}" for i in range(5)]
    assert len({r.record_id for r in records}) == 5
    page = store.call_records(count=2, after=records[1].record_id)
    assert [r.dialog_id for r in page] == ["d2", "d3"]


# ----------------------------------------------------------------------------- inspection


def test_profile_values_and_list(store: ExplicitStore) -> None:
    def user(v: str) -> Member:
        return Member("user", v, max=10)

    n = 0
    for v, k in (("alice", 2), ("bob", 1), ("c:{d} e", 1)):
        for _ in range(k):
            n += 1
            assert store.admit(req(f"d{n}", Member("total"), user(v),
                                   info={"call_id": f"c{n}"})).admitted
    assert store.profile_values("user") == {"alice": 2, "bob": 1, "c:{d} e": 1}
    assert store.profile_values("total") == {}
    assert store.profile_values("unknown") == {}
    listed = store.profile_list("user", "alice")
    assert [d.dialog_id for d in listed] == ["d1", "d2"]
    assert all(d.state == "early" and "user=alice" in d.profiles for d in listed)
    assert [d.info["call_id"] for d in listed] == ["c1", "c2"]
    assert {d.dialog_id for d in store.profile_list("total")} == {"d1", "d2", "d3", "d4"}
    assert [d.dialog_id for d in store.profile_list("user", "c:{d} e")] == ["d4"]
    store.release("d1", "bye")
    store.release("d3", "bye")
    assert store.profile_values("user") == {"alice": 1, "c:{d} e": 1}
    assert [d.dialog_id for d in store.profile_list("user", "alice")] == ["d2"]
    assert store.profile_list("user", "bob") == []


def test_namespaces_are_separate(store: ExplicitStore, redis_url: str) -> None:
    from tests.support import make_store, new_namespace

    kind = "memory" if type(store).__name__ == "MemoryStore" else "redis"
    other = make_store(kind, new_namespace(), redis_url)
    one = Member("total", max=1)
    assert store.admit(req("d1", one)).admitted
    assert other.admit(req("d1", one)).admitted  # same dialog id, other namespace
    assert other.profile_size("total") == 1
    other.limit_set("account", "acme", 7)
    assert store.limit_get("account", "acme") is None
    other.close()


def test_ping(store: ExplicitStore) -> None:
    assert store.ping() is True


@pytest.mark.parametrize("n", [0, 1, 8])
def test_many_members(store: ExplicitStore, n: int) -> None:
    members = [Member(f"p{i}", max=1) for i in range(n)]
    assert store.admit(req("d1", *members)).admitted
    r = store.admit(req("d2", *members))
    assert r.admitted == (n == 0)
    assert all(store.profile_size(f"p{i}") == 1 for i in range(n))


# ----------------------------------------------------------------------------- records end


def test_a_rejection_is_remembered_for_one_invite_transaction(store: ExplicitStore) -> None:
    one = Member("total", max=1)
    assert store.admit(req("d1", one)).admitted
    assert not store.admit(req("d2", one)).admitted
    store.release("d1", "bye")
    jump(store, 31_000)
    assert store.admit(req("d2", one)).duplicate
    jump(store, 2_000)  # 64*T1 = 32 s later the same id is a new call
    r = store.admit(req("d2", one))
    assert r.admitted and not r.duplicate
    assert store.profile_size("total") == 1


def test_an_ended_dialog_id_is_new_again_after_32_seconds(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    store.release("d1", "bye")
    assert store.admit(req("d1", TOTAL3)).duplicate  # a late retransmission
    assert store.profile_size("total") == 0
    jump(store, 33_000)
    r = store.admit(req("d1", TOTAL3))
    assert r.admitted and not r.duplicate
    assert store.profile_size("total") == 1
    assert store.release("d1", "bye") is not None
    assert len(store.call_records()) == 2


def test_a_dialog_forgotten_after_its_deadline_cannot_be_released(store: ExplicitStore) -> None:
    assert store.admit(req("d1", TOTAL3)).admitted
    jump(store, EARLY + 1_000)
    rec = store.release("d1", "cancel")  # shortly after the deadline: still a call end
    assert rec is not None and rec.reason == "cancel"
    assert store.admit(req("d2", TOTAL3)).admitted
    jump(store, EARLY + 61_000)  # long after: the record itself is gone
    assert store.release("d2", "bye") is None
    assert store.profile_size("total") == 0
    # the release of a dialog the store does not know leaves it ended (a record of it
    # still on its way counts nothing): its id is refused, as any ended dialog's
    again = store.admit(req("d2", TOTAL3))
    assert not again.admitted and again.duplicate and again.kind == "ended"
    jump(store, 121_000)  # once no record of it can come any more: a new call
    assert store.admit(req("d2", TOTAL3)).admitted
    assert store.profile_size("total") == 1
