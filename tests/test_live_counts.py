"""A count is a live call after any fault (issue 15), and a limit holds whoever re-sends
what (issue 21): what the decision function does with requests its caller gave up on,
with the fallback's decisions once Redis answers, with releases that come before the
admission they end, and with Call-IDs sent again. Runs unchanged on both stores (the
``store`` fixture), with time moved by the stores' clock offset."""

from __future__ import annotations

import pytest

from policer.call import Call
from policer.compile import ENDED_CODE, RECOVERY_MS
from policer.store import Op, Store, StoreError
from policer.store.keys import dialog_id
from tests.support import call, with_namespace
from tests.support.policies import ACCOUNT, INTERNATIONAL_CLASSES, build_policy, when

POLICY = build_policy(
    "lc", attributes=ACCOUNT, classes=INTERNATIONAL_CLASSES,
    profiles={"total": {}, "international": when("international"), "user": "from_user",
              "account": "account"},
    limits={"total": 10, "account": 3}, timeouts={"early": "120s"})
EARLY_MS = 120_000


@pytest.fixture
def live(store: Store) -> Store:
    store.load(with_namespace(POLICY, store.namespace))
    return store


def acme(user: str = "alice", number: str = "5551234", **kw: str) -> Call:
    return call(number, user, headers={"X-Account": "acme"}, **kw)


def did(c: Call) -> str:
    return dialog_id(c.call_id, c.from_tag)


def counts(store: Store) -> tuple[int, int, int]:
    return (store.profile_size("total"), store.profile_size("account", "acme"),
            store.stats()["active"])


def jump(store: Store, ms: int) -> None:
    store.clock_offset_ms += ms  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- late


def test_a_request_past_its_callers_deadline_writes_nothing(live: Store) -> None:
    c = acme()
    with pytest.raises(StoreError) as e:
        live.admit_call(c, "n1", deadline_ms=live.now_ms() - 1)
    assert e.value.late and "late" in str(e.value)
    assert counts(live) == (0, 0, 0)
    assert live.dialog(did(c)) is None
    assert live.stats()["processed"] == 0 and live.attempts() == []
    # the INVITE sent again (a retransmission, the caller's retry) is decided normally
    r = live.admit_call(c, "n1", deadline_ms=live.now_ms() + 50)
    assert r.admitted and not r.duplicate
    assert counts(live) == (1, 1, 1)


def test_a_request_within_its_deadline_is_decided(live: Store) -> None:
    r = live.admit_call(acme(), "n1", deadline_ms=live.now_ms() + 5_000)
    assert r.admitted and counts(live) == (1, 1, 1)


# ----------------------------------------------------------------------------- void


def test_a_voided_request_never_counts_whenever_it_arrives(live: Store) -> None:
    """The caller gave up, its fallback rejected the call, and the store learns it
    before the request itself arrives (it sat in a socket of a paused Redis)."""
    c = acme()
    deadline = live.now_ms() + 50
    assert live.apply([Op("void", did(c), deadline)]) == [True]
    with pytest.raises(StoreError) as e:  # the stale request, within its own deadline
        live.admit_call(c, "n1", deadline_ms=deadline)
    assert e.value.late
    assert counts(live) == (0, 0, 0) and live.dialog(did(c)) is None
    # the INVITE re-sent after the stall carries a later deadline: decided normally
    r = live.admit_call(c, "n1", deadline_ms=deadline + 600)
    assert r.admitted and not r.duplicate and counts(live) == (1, 1, 1)
    # and a void of the old request arriving after that leaves the new call alone
    assert live.apply([Op("void", did(c), deadline)]) == [False]
    assert counts(live) == (1, 1, 1)


def test_a_request_applied_in_time_whose_answer_came_too_late_is_settled(live: Store) -> None:
    """Redis decided in time but the answer reached the proxy after its timeout (a slow
    command of another client delayed the reply): the fallback rejected the call, so
    the admission is undone, without a call-end record (there was no call)."""
    c = acme()
    deadline = live.now_ms() + 5_000
    assert live.admit_call(c, "n1", deadline_ms=deadline).admitted
    assert counts(live) == (1, 1, 1)
    assert live.apply([Op("void", did(c), deadline)]) == [True]
    assert counts(live) == (0, 0, 0)
    assert live.call_records() == []
    assert live.ended().get("abandoned") == 1
    # the request sent again by redis-py or ndb_redis after a reconnect: nothing
    again = live.admit_call(c, "n1", deadline_ms=deadline)
    assert not again.admitted and again.duplicate and counts(live) == (0, 0, 0)


# ----------------------------------------------------------------------------- records


def test_a_release_that_comes_before_the_record_wins(live: Store) -> None:
    """Worker A admitted the call by its fallback (Redis frozen) and queued its record;
    the release reached worker B, which applied it first: the record counts nothing."""
    c = acme()
    assert live.apply([Op("release", did(c), "bye")]) == [False]
    assert live.apply([Op("record", did(c), live.now_ms(), call=c, node="n1")]) == [False]
    assert counts(live) == (0, 0, 0)
    assert live.dialog(did(c)) is None


def test_a_record_counts_the_call_once_from_when_it_was_decided(live: Store) -> None:
    c = acme()
    decided = live.now_ms()
    jump(live, 60_000)  # recorded a minute later: it counts until decided + early timeout
    op = Op("record", did(c), decided, call=c, node="n1")
    assert live.apply([op, op]) == [True, False]
    assert counts(live) == (1, 1, 1)
    jump(live, EARLY_MS - 60_000 + 1)
    assert live.tick("n1", 0, False).expired == 1  # its deadline passed: swept
    assert counts(live) == (0, 0, 0)


def test_a_record_too_old_to_count_is_not_counted(live: Store) -> None:
    c = acme()
    decided = live.now_ms() - EARLY_MS - 1
    assert live.apply([Op("record", did(c), decided, call=c, node="n1")]) == [False]
    assert counts(live) == (0, 0, 0)


def test_a_record_of_a_call_redis_rejected_too_late_counts_it(live: Store) -> None:
    """Redis rejected the call, the answer came too late, the fallback admitted it: the
    call is up, so it counts (the fallback's decision stands)."""
    for i in range(3):
        assert live.admit_call(acme(f"u{i}"), "n1").admitted
    c = acme("late")
    assert not live.admit_call(c, "n1").admitted
    assert live.apply([Op("record", did(c), live.now_ms(), call=c, node="n1")]) == [True]
    assert counts(live) == (4, 4, 4)


# ----------------------------------------------------------------------------- re-sent ids


def test_a_call_id_sent_again_after_its_call_ended_is_never_admitted_uncounted(
        live: Store) -> None:
    """Issue 21: three calls to the limit, released, then the same three admits again
    and three new calls: the re-sent ones are rejected (the dialog is over: a late
    retransmission of a cancelled call's INVITE must not become a call), the new ones
    are counted, and the account never holds more than its max."""
    first = [acme(f"u{i}") for i in range(3)]
    assert all(live.admit_call(c, "n1").admitted for c in first)
    for c in first:
        assert live.apply([Op("release", did(c), "cancel")]) == [True]
    again = [live.admit_call(c, "n1") for c in first]
    assert all(not r.admitted and r.duplicate and r.kind == "ended"
               and r.code == ENDED_CODE for r in again)
    assert counts(live) == (0, 0, 0)
    new = [live.admit_call(acme(f"n{i}"), "n1") for i in range(3)]
    assert all(r.admitted and not r.duplicate for r in new)
    assert counts(live) == (3, 3, 3)
    assert not live.admit_call(acme("n4"), "n1").admitted


def test_an_emergency_call_always_passes_whatever_its_id_got_before(live: Store) -> None:
    for i in range(3):
        assert live.admit_call(acme(f"u{i}"), "n1").admitted
    rejected = acme("x", call_id="sos-1@test")
    assert not live.admit_call(rejected, "n1").admitted
    sos = acme("x", "112", call_id="sos-1@test")  # the same id, now an emergency call
    r = live.admit_call(sos, "n1")
    assert r.admitted and r.emergency and not r.duplicate
    assert counts(live) == (4, 4, 4)  # counted (reserve aside, bypass is the policy's)
    assert live.apply([Op("release", did(sos), "bye")]) == [True]
    r = live.admit_call(sos, "n1")  # ended, re-sent as an emergency call: counted anew
    assert r.admitted and not r.duplicate
    assert counts(live) == (4, 4, 4)


def test_a_retransmission_of_a_live_call_is_the_same_call(live: Store) -> None:
    c = acme()
    first = live.admit_call(c, "n1", deadline_ms=live.now_ms() + 5_000)
    second = live.admit_call(c, "n1", deadline_ms=live.now_ms() + 5_500)
    assert first.admitted and second.admitted and second.duplicate
    assert counts(live) == (1, 1, 1)


# ----------------------------------------------------------------------------- recovery


def test_after_redis_lost_its_state_admits_wait_for_the_nodes(live: Store) -> None:
    """A new state epoch after a loss holds admits (the callers' fallback decides,
    emergency calls included: a fallback always admits them) for RECOVERY_MS while the
    nodes put their calls back; records are applied meanwhile."""
    epoch = live.tick("n1", 0, False, epoch="init").epoch
    assert epoch and live.tick("n1", 0, False, epoch="init").epoch == epoch  # kept
    lost = live.tick("n1", 0, False, epoch=f"lost:{epoch}").epoch
    assert lost and lost != epoch
    # a second node noticing the same loss does not start another epoch
    assert live.tick("n2", 0, False, epoch=f"lost:{epoch}").epoch == lost
    with pytest.raises(StoreError, match="recovering"):
        live.admit_call(acme(), "n1")
    c = acme("up")
    assert live.apply([Op("record", did(c), live.now_ms(), call=c, node="n1")]) == [True]
    jump(live, RECOVERY_MS)
    assert live.admit_call(acme(), "n1").admitted
    assert counts(live) == (2, 2, 2)


# ----------------------------------------------------------------------------- nodes


def test_a_node_held_by_a_live_instance_is_not_taken(live: Store) -> None:
    a = live.tick("n1", 30_000, False, start=True, instance="a", renew_ms=5_000)
    assert a.owner == ""
    live.tick("n1", 30_000, False, instance="a", renew_ms=5_000)  # a renews
    b = live.tick("n1", 30_000, False, start=True, instance="b", renew_ms=5_000)
    assert b.owner.startswith("owned:") and 0 < int(b.owner[6:]) <= 6_500
    jump(live, 6_600)  # a renewed no more within its renew interval: it is gone
    b = live.tick("n1", 30_000, False, start=True, instance="b", renew_ms=5_000)
    assert b.owner == ""


def test_a_lease_that_lapsed_is_reported_on_renewal(live: Store) -> None:
    # n1 is cut off while n2 renews every second: n1's lease lapses, n2 ends its calls
    assert not live.tick("n1", 2_000, False, start=True, instance="a", renew_ms=1_000).lapsed
    assert not live.tick("n2", 2_000, False, start=True, instance="b", renew_ms=1_000).lapsed
    assert live.admit_call(acme(), "n1").admitted
    for _ in range(3):
        jump(live, 1_000)
        live.tick("n2", 2_000, True, instance="b", renew_ms=1_000)
    assert counts(live) == (0, 0, 0)
    assert live.ended() == {"node_lost": 1}
    assert live.tick("n1", 2_000, False, instance="a", renew_ms=1_000).lapsed
    assert not live.tick("n1", 2_000, False, instance="a", renew_ms=1_000).lapsed


def test_a_store_stalled_longer_than_the_lease_loses_no_node(live: Store) -> None:
    # Redis paused 5 s (its clock moves on, nobody can renew): the first node to tick
    # after it finds the other's lease alive, ends none of its calls, and neither node
    # is told its lease lapsed
    live.tick("n1", 2_000, False, start=True, instance="a", renew_ms=1_000)
    live.tick("n2", 2_000, False, start=True, instance="b", renew_ms=1_000)
    c = acme()
    assert live.admit_call(c, "n1").admitted
    jump(live, 5_000)
    assert not live.tick("n2", 2_000, True, instance="b", renew_ms=1_000).lapsed
    assert counts(live) == (1, 1, 1)
    assert not live.tick("n1", 2_000, True, instance="a", renew_ms=1_000).lapsed
    assert live.ended() == {}
    # a node gone for good still lapses, a lease after the stall
    for _ in range(3):
        jump(live, 1_000)
        live.tick("n2", 2_000, True, instance="b", renew_ms=1_000)
    assert counts(live) == (0, 0, 0)
    assert live.ended() == {"node_lost": 1}
    assert live.dialog(did(c)) is not None
