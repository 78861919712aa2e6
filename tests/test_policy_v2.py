"""Policy language v2 (issue 9) on both stores: call rates (GCRA), calendar windows
in the policy's timezone, schedules, ``max_duration``, ``rate_reject``, live rate and
window caps, usage.

Every test runs over the Redis store (the compiled decision function) and the
in-process model (the ``store`` fixture behind ``engine_for``). Time moves only
through the stores' ``clock_offset_ms``; calendar tests put the store's clock at
fixed instants (Europe/Berlin) and jump across boundaries. A Retry-After is checked
against the store's clock read before and after the decision, so the real time a
busy machine spends running the test can never change the verdict.
"""

from __future__ import annotations

import datetime as dt
import math
from zoneinfo import ZoneInfo

import pytest

from policer.call import Call
from policer.engine import Decision, Engine
from policer.policy import Rate, load_policy
from policer.store import AdmitRequest, Member, Store
from tests.support import POLICIES, EngineFactory, call, policy_file
from tests.support.explicit import ExplicitStore

BERLIN = ZoneInfo("Europe/Berlin")

BASE = """
version: 2
namespace: v2
timezone: Europe/Berlin
call: {attributes: {account: "header:X-Account"}}
classes:
  emergency: {numbers: ["112"]}
  international: {prefixes: ["00"]}
  local: {default: true}
schedules:
  business: {days: [mon, tue, wed, thu, fri], hours: "08:00-18:00"}
profiles:
  total: {}
  emergency: {when: {class: emergency}}
  international: {when: {class: international}}
  account: {value: account}
  user: {value: from_user}
emergency: {class: emergency, bypass: true}
reject: {code: 503, reason: "Call Limit Reached", retry_after: 30}
"""


def v2(limits: str, extra: str = "") -> str:
    """The base policy with these ``limits:`` (and more top-level keys)."""
    return BASE + "limits:\n" + limits + extra


def acme(user: str = "alice", number: str = "5551234", account: str = "acme",
         call_id: str | None = None) -> Call:
    return call(number, user, headers={"X-Account": account}, call_id=call_id)


# ----------------------------------------------------------------------------- clock


def jump(store: Store, ms: int) -> None:
    store.clock_offset_ms += ms  # type: ignore[attr-defined]


def set_clock(store: Store, at_ms: int) -> None:
    """Move the store's clock to ``at_ms`` (Unix ms)."""
    jump(store, at_ms - store.now_ms())


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
           second: int = 0) -> int:
    """A Berlin wall-clock instant as Unix ms."""
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=BERLIN)
               .timestamp() * 1000)


def retry_between(until_ms: int, before_ms: int, after_ms: int) -> range:
    """The Retry-After values a decision taken between two clock reads may carry, for a
    call that would pass at ``until_ms``: seconds, rounded up, at least 1."""
    lo = max(1, math.ceil((until_ms - after_ms) / 1000))
    hi = max(1, math.ceil((until_ms - before_ms) / 1000))
    return range(lo, hi + 1)


def admitted(e: Engine, n: int, **kw: str) -> list[Decision]:
    out = []
    for i in range(n):
        d = e.admit(acme(user=f"u{i}-{kw.get('account', 'acme')}", **kw))
        assert d.admitted and not d.bypass, d
        out.append(d)
    return out


# ----------------------------------------------------------------------------- rates

RATE = v2("""
  account:
    rate: {max: 10, per: 1m, burst: 3}      # one call per 6 s, three at once
    reject: {code: 486, reason: "Account Call Limit"}
    rate_reject: {code: 503, reason: "Call Rate Exceeded"}
""")


def test_a_rate_passes_its_burst_then_rejects_with_the_seconds_until_the_next(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(RATE)
    before = store.now_ms()
    admitted(e, 3)
    d = e.admit(acme("next"))
    after = store.now_ms()
    assert (d.admitted, d.code, d.reason) == (False, 503, "Call Rate Exceeded")
    assert (d.kind, d.limit, d.window) == ("rate", "account", None)
    assert (d.count, d.max) == (3, 3)  # three calls owed of a burst of three
    # the first call came at `before` or later: the next passes 6 s after it
    assert d.retry_after in retry_between(before + 6_000, before, after)
    assert d.retry_after == 6 or after - before > 1_000
    assert store.stats()["rejected"] == 1
    # another account has its own rate
    assert e.admit(acme("bob", account="beta")).admitted
    # T later exactly one more call passes
    jump(store, 6_000)
    assert e.admit(acme("later")).admitted
    d = e.admit(acme("later2"))
    assert not d.admitted and d.kind == "rate"
    # a pause refills the whole burst, never more
    jump(store, 60_000)
    admitted(e, 3)
    assert e.admit(acme("over")).kind == "rate"


def test_a_rate_alone_on_an_unvalued_profile_falls_back_to_the_limits_reject(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("""
  total: {rate: {max: 2, per: 1m}, reject: {code: 480, reason: "Slow Down"}}
"""))
    before = store.now_ms()
    assert e.admit(acme("a")).admitted
    assert e.admit(acme("b")).admitted
    d = e.admit(acme("c"))
    assert (d.admitted, d.code, d.reason, d.kind, d.limit) == (
        False, 480, "Slow Down", "rate", "total")
    assert d.retry_after in retry_between(before + 30_000, before, store.now_ms())
    jump(store, 30_000)
    assert e.admit(acme("d")).admitted
    assert store.profile_size("total") == 3  # a rate alone caps no concurrency


def test_a_rate_without_any_reject_answers_with_the_policy_default(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("  account: {rate: {max: 1, per: 1h}}\n"))
    assert e.admit(acme()).admitted
    d = e.admit(acme())
    assert (d.code, d.reason, d.kind) == (503, "Call Limit Reached", "rate")
    # computed, not the default's 30 s
    assert d.retry_after is not None and 3_590 <= d.retry_after <= 3_600


# ----------------------------------------------------------------------------- calendar windows

DAILY = v2("""
  account:
    calls: [{max: 2, per: 1d}]
    reject: {code: 486, reason: "Account Call Limit"}
""")


def test_a_daily_cap_resets_at_local_midnight_not_utc(engine_for: EngineFactory,
                                                     store: Store) -> None:
    e = engine_for(DAILY)
    # 23:59:50 in Berlin on a winter day is 22:59:50 UTC
    midnight = berlin(2031, 1, 16)
    set_clock(store, midnight - 10_000)
    before = store.now_ms()
    admitted(e, 2)
    d = e.admit(acme("third"))
    after = store.now_ms()
    assert (d.admitted, d.code, d.reason, d.kind, d.window) == (
        False, 486, "Account Call Limit", "calls", "1d")
    assert (d.limit, d.count, d.max) == ("account", 2, 2)
    assert d.retry_after in retry_between(midnight, before, after)
    assert store.usage("account", "acme").calls == {"1d": 2}
    jump(store, 20_000)  # 00:00:10 in Berlin: a new day
    assert store.usage("account", "acme").calls == {"1d": 0}
    before = store.now_ms()
    admitted(e, 2)
    d = e.admit(acme("third"))
    after = store.now_ms()
    assert d.kind == "calls" and d.window == "1d"
    assert d.retry_after in retry_between(berlin(2031, 1, 17), before, after)
    # UTC midnight (01:00 in Berlin, the same day) is no boundary
    set_clock(store, int(dt.datetime(2031, 1, 16, tzinfo=dt.UTC).timestamp() * 1000) + 10_000)
    assert e.admit(acme("utc")).kind == "calls"


def test_a_day_is_23_hours_when_the_clocks_go_forward(engine_for: EngineFactory,
                                                      store: Store) -> None:
    e = engine_for(DAILY)
    start = berlin(2031, 3, 30)  # a Sunday: 02:00 becomes 03:00
    set_clock(store, start + 10_000)
    before = store.now_ms()
    admitted(e, 2)
    d = e.admit(acme("third"))
    after = store.now_ms()
    assert d.retry_after in retry_between(start + 23 * 3_600_000, before, after)
    set_clock(store, start + 23 * 3_600_000 + 10_000)  # Monday 00:00:10
    assert e.admit(acme("monday")).admitted


def test_a_weekly_window_starts_on_monday(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("  account: {calls: [{max: 1, per: 7d}]}\n"))
    set_clock(store, berlin(2031, 1, 15, 12))  # a Wednesday
    assert e.admit(acme()).admitted
    monday = berlin(2031, 1, 20)
    set_clock(store, monday - 10_000)  # Sunday 23:59:50: the same week
    before = store.now_ms()
    d = e.admit(acme())
    after = store.now_ms()
    assert (d.admitted, d.kind, d.window) == (False, "calls", "7d")
    assert d.retry_after in retry_between(monday, before, after)
    jump(store, 20_000)
    assert e.admit(acme()).admitted
    assert store.usage("account", "acme").calls == {"7d": 1}


def test_a_monthly_window_follows_the_calendar(engine_for: EngineFactory,
                                               store: Store) -> None:
    e = engine_for(v2("  account: {calls: [{max: 1, per: 1mo}, {max: 5, per: 1d}]}\n"))
    set_clock(store, berlin(2031, 2, 1, 0, 0, 10))
    before = store.now_ms()
    assert e.admit(acme()).admitted
    d = e.admit(acme())
    after = store.now_ms()
    assert (d.kind, d.window) == ("calls", "1mo")  # February: 28 days
    assert d.retry_after in retry_between(berlin(2031, 3, 1), before, after)
    set_clock(store, berlin(2031, 2, 28, 23, 59, 50))
    assert e.admit(acme()).window == "1mo"
    assert store.usage("account", "acme").calls == {"1mo": 1, "1d": 0}
    jump(store, 20_000)
    assert e.admit(acme()).admitted
    assert store.usage("account", "acme").calls == {"1mo": 1, "1d": 1}


def test_the_shortest_full_window_answers(engine_for: EngineFactory,
                                               store: Store) -> None:
    e = engine_for(v2("  account: {calls: [{max: 5, per: 1d}, {max: 2, per: 1h}]}\n"))
    set_clock(store, berlin(2031, 1, 15, 10, 30))
    admitted(e, 2)
    d = e.admit(acme())
    assert (d.kind, d.window, d.count, d.max) == ("calls", "1h", 2, 2)
    set_clock(store, berlin(2031, 1, 15, 11, 0, 10))
    admitted(e, 2)
    set_clock(store, berlin(2031, 1, 15, 12, 0, 10))
    assert e.admit(acme()).admitted
    d = e.admit(acme())
    assert (d.kind, d.window, d.count, d.max) == ("calls", "1d", 5, 5)
    assert store.usage("account", "acme").calls == {"1d": 5, "1h": 1}


# ----------------------------------------------------------------------------- schedules

SCHEDULED = v2("""
  international:
    - {max: 1, schedule: business}
    - {max: 0, reject: {code: 403, reason: "International Closed"}}
""")


def test_explain_at_an_instant_picks_the_schedule_entry_of_that_instant(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(SCHEDULED)
    c = acme(number="00441632960123")
    day = e.explain(c, at_ms=berlin(2031, 1, 15, 10))  # Wednesday 10:00
    night = e.explain(c, at_ms=berlin(2031, 1, 15, 23))
    weekend = e.explain(c, at_ms=berlin(2031, 1, 18, 10))  # Saturday
    intl = [x for x in day.limits if x.profile == "international"]
    assert [(x.max, x.would_trip) for x in intl] == [(1, False)]
    assert day.decision.admitted
    for ex in (night, weekend):
        assert [(x.max, x.would_trip) for x in ex.limits if x.profile == "international"] \
            == [(0, True)]
        assert (ex.decision.admitted, ex.decision.code, ex.decision.reason) == (
            False, 403, "International Closed")
    assert store.stats()["processed"] == 0  # a dry run
    # the admit decides by the store's clock
    set_clock(store, berlin(2031, 1, 15, 23))
    d = e.admit(c)
    assert (d.admitted, d.code, d.kind, d.max) == (False, 403, "concurrent", 0)
    set_clock(store, berlin(2031, 1, 16, 7, 59, 50))
    assert not e.admit(acme(number="0044")).admitted
    set_clock(store, berlin(2031, 1, 16, 8, 0, 10))
    assert e.admit(acme(number="0044")).admitted
    d = e.admit(acme(number="0044"))
    assert (d.admitted, d.max, d.count) == (False, 1, 1)


def test_explain_at_an_instant_reads_the_windows_of_that_instant(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(DAILY)
    set_clock(store, berlin(2031, 1, 15, 12))
    admitted(e, 2)
    now = e.explain(acme())
    tomorrow = e.explain(acme(), at_ms=berlin(2031, 1, 16, 12))
    assert [x.windows for x in now.limits if x.profile == "account"] == [(("1d", 2, 2),)]
    assert now.decision.kind == "calls" and not now.decision.admitted
    assert [x.windows for x in tomorrow.limits if x.profile == "account"] == [(("1d", 0, 2),)]
    assert tomorrow.decision.admitted


# ----------------------------------------------------------------------------- all or none

ALL_OR_NONE = v2("""
  total: {max: 50}
  account:
    rate: {max: 10, per: 1m, burst: 3}
    calls: [{max: 100, per: 1d}]
  user: {max: 1}
  international: {max: 0}
""")


def test_a_call_rejected_by_any_limit_spends_no_token_and_no_window_count(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(ALL_OR_NONE)
    set_clock(store, berlin(2031, 1, 15, 12))
    assert e.admit(acme("alice")).admitted
    before = store.usage("account", "acme")
    assert before.calls == {"1d": 1}
    assert before.rate is not None and 0 < before.rate <= 1 / 3
    for _ in range(5):
        d = e.admit(acme("alice"))  # the user's concurrency cap rejects
        assert (d.admitted, d.limit, d.kind) == (False, "user", "concurrent")
        d = e.admit(acme("bob", number="0044"))  # a profile after the account rejects
        assert (d.admitted, d.limit) == (False, "international")
    after = store.usage("account", "acme")
    assert after.calls == {"1d": 1}
    assert after.rate is not None and after.rate <= before.rate
    # the burst is all there: two more pass, the third is the rate's
    assert e.admit(acme("carol")).admitted
    assert e.admit(acme("dave")).admitted
    assert e.admit(acme("eve")).kind == "rate"
    assert store.usage("account", "acme").calls == {"1d": 3}
    assert store.profile_size("account", "acme") == 3


def test_a_call_rejected_by_a_window_spends_no_token_of_a_rate(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("""
  total: {rate: {max: 10, per: 1m, burst: 2}}
  account: {calls: [{max: 1, per: 1d}]}
"""))
    set_clock(store, berlin(2031, 1, 15, 12))
    assert e.admit(acme()).admitted
    for _ in range(3):
        assert e.admit(acme()).kind == "calls"
    assert e.admit(acme(account="beta")).admitted  # the second token is still there
    assert e.admit(acme(account="gamma")).kind == "rate"
    assert store.usage("account", "acme").calls == {"1d": 1}


# ----------------------------------------------------------------------------- emergency, shadow

EMERGENCY = v2("""
  total:
    rate: {max: 10, per: 1m, burst: 2}
    calls: [{max: 3, per: 1d}]
""")


def test_emergency_bypass_is_counted_everywhere_and_never_rejected(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(EMERGENCY)
    set_clock(store, berlin(2031, 1, 15, 12))
    admitted(e, 2)
    assert e.admit(acme("over")).kind == "rate"
    sos = e.admit(acme("caller", number="112"))
    assert (sos.admitted, sos.bypass, sos.kind, sos.limit) == (True, True, "rate", "total")
    u = store.usage("total", None)
    assert u.calls == {"1d": 3}
    assert u.rate is not None and u.rate > 1  # the emergency call spent a token it had not
    # the window is full now, emergency calls still pass and still count
    jump(store, 60_000)
    d = e.admit(acme("later"))
    assert (d.admitted, d.kind, d.window) == (False, "calls", "1d")
    sos = e.admit(acme("caller2", number="112"))
    assert (sos.admitted, sos.bypass, sos.kind, sos.window) == (True, True, "calls", "1d")
    assert store.usage("total", None).calls == {"1d": 4}
    assert store.stats()["bypassed"] == 2


def test_a_bypassed_call_asked_about_again_has_no_retry_after(engine_for: EngineFactory,
                                                              store: ExplicitStore) -> None:
    """Retry-After answers rejections only; an emergency call admitted over a rate keeps
    kind and limit, on either calling convention."""
    e = engine_for(EMERGENCY)
    admitted(e, 2)
    sos = e.admit(acme("caller", number="112"))
    assert sos.bypass and sos.retry_after is None
    again = store.admit(AdmitRequest(sos.dialog_id, (Member("total"),), 10_000))
    assert (again.duplicate, again.admitted, again.bypass, again.kind) == (
        True, True, True, "rate")
    assert again.retry_after == -1


def test_shadow_rates_and_windows_admit_and_report(engine_for: EngineFactory,
                                                    store: Store) -> None:
    e = engine_for(v2("""
  account: {rate: {max: 1, per: 1m}, shadow: true}
  user: {calls: [{max: 1, per: 1d}], shadow: true}
"""))
    set_clock(store, berlin(2031, 1, 15, 12))
    first = e.admit(acme("alice"))
    assert first.admitted and not first.shadow and first.kind is None
    d = e.admit(acme("bob"))
    assert (d.admitted, d.shadow, d.kind, d.limit) == (True, True, "rate", "account")
    assert d.retry_after is None
    d = e.admit(acme("alice", account="beta"))
    assert (d.admitted, d.shadow, d.kind, d.window, d.limit) == (True, True, "calls", "1d",
                                                                 "user")
    assert store.stats()["shadow_rejected"] == 2
    assert store.usage("user", "alice").calls == {"1d": 2}  # shadowed calls still count


# ----------------------------------------------------------------------------- max duration

DURATION = v2("""
  account: {max: 10, max_duration: 2h}
  international: {max: 10}
""", "timeouts: {dialog: 12h, max_duration: {default: 4h, international: 1h}}\n")


def test_the_decision_carries_the_smallest_max_duration(engine_for: EngineFactory,
                                                        store: Store) -> None:
    e = engine_for(DURATION)
    assert e.admit(acme()).max_duration == 2 * 3600  # the account's limit
    assert e.admit(call("5551234", "anon")).max_duration == 4 * 3600  # the default
    assert e.admit(call("0044", "anon")).max_duration == 3600  # the class's
    assert e.admit(acme(number="0044")).max_duration == 3600
    assert e.explain(acme()).decision.max_duration == 2 * 3600


def test_an_answered_call_ends_at_its_max_duration_as_duration_cap(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(DURATION)
    d = e.admit(acme())
    assert d.admitted and d.max_duration == 7200
    jump(store, 5_000)
    assert e.confirm(d.dialog_id)
    jump(store, 3_600_000)
    assert e.refresh(d.dialog_id)  # a re-INVITE never pushes the call past its cap
    assert store.profile_size("account", "acme") == 1
    jump(store, 3_600_000 - 5_000)  # 2 h after the answer, 5 s before...
    assert store.profile_size("account", "acme") == 1
    jump(store, 10_000)  # ... and 5 s after: the next sweep frees the slot
    assert store.profile_size("account", "acme") == 1
    assert store.tick("test-node", 0, False)[2] == 1
    assert store.profile_size("account", "acme") == 0
    assert store.stats()["active"] == 0
    recs = store.call_records()
    assert [(r.dialog_id, r.reason) for r in recs] == [(d.dialog_id, "duration_cap")]
    assert recs[0].answer_ms > 0
    assert store.ended() == {"duration_cap": 1}
    assert e.release(d.dialog_id) is None  # already ended


def test_the_earlier_decision_carries_its_max_duration_on_either_calling_convention(
        engine_for: EngineFactory, store: ExplicitStore) -> None:
    """The dialog decided from its raw call, then asked about over explicit memberships
    (the store contract's convention): the same decision, max duration included."""
    e = engine_for(DURATION)
    d = e.admit(acme())
    again = store.admit(AdmitRequest(d.dialog_id, (Member("total"),), 10_000))
    assert again.duplicate and again.admitted
    assert again.max_duration_ms == 7_200_000


def test_an_unanswered_call_is_ended_by_its_early_timeout_not_its_cap(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("  account: {max: 10, max_duration: 1m}\n",
                      "timeouts: {early: 2m}\n"))
    d = e.admit(acme())
    jump(store, 90_000)  # past the max duration, before the early timeout
    assert store.profile_size("account", "acme") == 1
    jump(store, 40_000)
    assert store.profile_size("account", "acme") == 1  # until the next sweep
    assert store.tick("test-node", 0, False)[2] == 1
    assert store.profile_size("account", "acme") == 0
    assert [r.reason for r in store.call_records()] == ["expired"]
    assert d.max_duration == 60


# ----------------------------------------------------------------------------- live caps, usage


def test_live_rates_override_the_policys_for_one_value(engine_for: EngineFactory,
                                                        store: Store) -> None:
    e = engine_for(v2("""
  account: {rate: {max: 60, per: 1m, burst: 5}, calls: [{max: 100, per: 1d}]}
"""))
    set_clock(store, berlin(2031, 1, 15, 12))
    assert store.rate_limit_set("account", "acme", Rate(1, 60_000, 1)) is None
    before = store.now_ms()
    assert e.admit(acme()).admitted
    d = e.admit(acme())
    assert (d.admitted, d.kind, d.count, d.max) == (False, "rate", 1, 1)
    assert d.retry_after in retry_between(before + 60_000, before, store.now_ms())
    u = store.usage("account", "acme")
    assert u.rate is not None and 0.95 < u.rate <= 1
    admitted(e, 5, account="beta")  # the policy's rate for every other value
    assert store.rate_limit_set("account", "acme", Rate(2, 60_000, 2)) == Rate(1, 60_000, 1)
    assert store.rate_limit_set("account", "acme", None) == Rate(2, 60_000, 2)
    assert store.rate_limit_set("account", "acme", None) is None
    jump(store, 60_000)
    admitted(e, 5)
    assert e.admit(acme()).kind == "rate"


def test_a_live_rate_can_cap_a_value_the_policy_gives_no_rate(engine_for: EngineFactory,
                                                               store: Store) -> None:
    e = engine_for(v2("  account: {max: 10}\n"))
    store.rate_limit_set("account", "acme", Rate(1, 60_000, 1))
    before = store.now_ms()
    assert e.admit(acme()).admitted
    d = e.admit(acme())
    assert (d.admitted, d.kind) == (False, "rate")
    assert d.retry_after in retry_between(before + 60_000, before, store.now_ms())
    assert e.admit(acme(account="beta")).admitted
    assert e.admit(acme(account="beta")).admitted


def test_live_window_caps_and_usage(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("""
  account: {calls: [{max: 100, per: 1d}, {max: 50, per: 1h}]}
"""))
    set_clock(store, berlin(2031, 1, 15, 12))
    assert store.usage("account", "acme") == store.usage("account", "acme")
    assert store.usage("account", "acme").calls == {"1d": 0, "1h": 0}
    assert store.usage("account", "acme").rate is None
    assert store.calls_limit_set("account", "acme", "1d", 2) is None
    admitted(e, 2)
    d = e.admit(acme())
    assert (d.kind, d.window, d.count, d.max) == ("calls", "1d", 2, 2)
    assert store.usage("account", "acme").calls == {"1d": 2, "1h": 2}
    assert store.calls_limit_set("account", "acme", "1d", 3) == 2
    assert e.admit(acme()).admitted
    assert e.admit(acme()).max == 3
    assert store.calls_limit_set("account", "acme", "1d", None) == 3
    assert store.calls_limit_set("account", "acme", "1d", None) is None
    assert e.admit(acme()).admitted
    admitted(e, 3, account="beta")  # other values keep the policy's caps
    assert store.usage("account", "beta").calls == {"1d": 3, "1h": 3}
    assert store.usage("account", "acme").calls == {"1d": 4, "1h": 4}
    assert store.limits("account") == {}  # rate and window state is no concurrency limit


# ----------------------------------------------------------------------------- retransmissions


def test_a_retransmitted_invite_gets_the_same_answer_with_kind_window_retry_after(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(v2("""
  account:
    rate: {max: 10, per: 1m, burst: 1}
    rate_reject: {code: 503, reason: "Call Rate Exceeded"}
  user: {calls: [{max: 1, per: 1d}], reject: {code: 486, reason: "Daily Cap"}}
""", "timeouts: {max_duration: 1h}\n"))
    set_clock(store, berlin(2031, 1, 15, 12))
    ok = e.admit(acme("alice", call_id="c-ok"))
    rate = e.admit(acme("bob", call_id="c-rate"))
    window = e.admit(acme("alice", account="beta", call_id="c-window"))
    assert ok.admitted and ok.max_duration == 3600
    assert (rate.kind, rate.code) == ("rate", 503)
    assert (window.kind, window.window, window.code) == ("calls", "1d", 486)
    jump(store, 20_000)  # the rate has room again; within one INVITE transaction
    for first, c in ((ok, acme("alice", call_id="c-ok")),
                     (rate, acme("bob", call_id="c-rate")),
                     (window, acme("alice", account="beta", call_id="c-window"))):
        again = e.admit(c)
        assert again.duplicate
        assert (again.admitted, again.code, again.reason, again.retry_after, again.kind,
                again.window, again.limit, again.count, again.max, again.max_duration) == (
            first.admitted, first.code, first.reason, first.retry_after, first.kind,
            first.window, first.limit, first.count, first.max, first.max_duration)
    assert store.usage("account", "acme").calls == {}
    assert store.stats()["processed"] == 1 and store.stats()["rejected"] == 2


@pytest.mark.parametrize("per", ["1m", "1h"])
def test_short_windows_reset_at_their_boundary(engine_for: EngineFactory, store: Store,
                                               per: str) -> None:
    e = engine_for(v2(f"  account: {{calls: [{{max: 1, per: {per}}}]}}\n"))
    boundary = berlin(2031, 1, 15, 13)
    set_clock(store, boundary - 10_000)
    assert e.admit(acme()).admitted
    before = store.now_ms()
    d = e.admit(acme())
    after = store.now_ms()
    assert (d.kind, d.window) == ("calls", per)
    assert d.retry_after in retry_between(boundary, before, after)
    jump(store, 20_000)
    assert e.admit(acme()).admitted


# ----------------------------------------------------------------------------- policies/v2.yaml


def test_the_v2_example_reads_as_its_comments_say() -> None:
    p = load_policy(POLICIES / "v2.yaml")
    assert (p.version, p.timezone) == (2, "Europe/Berlin")
    trunk = p.limits["trunk"]
    assert trunk.rate == Rate(10, 1_000, 20) and trunk.max == -1
    assert (trunk.rate_answer.code, trunk.rate_answer.reason) == (503, "Call Rate Exceeded")
    acct = p.limits["account"]
    assert {(w.max, w.per) for w in acct.calls} == {(5000, "1d"), (500, "1h")}
    assert [(e.max, e.schedule) for e in p.entries("international")] == [
        (200, "business"), (50, None)]
    assert p.timeouts.max_duration_ms == 4 * 3_600_000
    assert dict(p.timeouts.max_duration_by_class) == {"international": 2 * 3_600_000}


def test_the_v2_example_decides_as_documented(engine_for: EngineFactory,
                                             store: Store) -> None:
    e = engine_for(policy_file(POLICIES / "v2.yaml"))
    set_clock(store, berlin(2031, 1, 15, 10))  # a Wednesday morning

    def trunk_call(ip: str = "192.0.2.10", number: str = "0301234567",
                   account: str = "acme") -> Call:
        return call(number, "pbx", headers={"X-Account": account}, source_ip=ip)

    # a trunk sold at 10 cps: a burst of 20 (and one more per 100 ms the test took),
    # then 503 with Retry-After
    def until_rejected() -> tuple[int, Decision]:
        before = store.now_ms()
        n = 0
        while (d := e.admit(trunk_call())).admitted and n < 100:
            assert d.max_duration == 4 * 3600
            n += 1
        assert n <= 20 + (store.now_ms() - before) // 100
        return n, d

    n, d = until_rejected()
    assert n >= 20
    assert (d.admitted, d.code, d.reason, d.kind, d.retry_after) == (
        False, 503, "Call Rate Exceeded", "rate", 1)
    assert e.admit(trunk_call("192.0.2.11")).admitted  # another trunk has its own
    jump(store, 1_000)  # ten more per second
    assert until_rejected()[0] >= 10
    # the account's calendar caps (a live cap keeps the test short)
    store.calls_limit_set("account", "tiny", "1d", 2)
    for i in range(2):
        assert e.admit(trunk_call(f"192.0.2.{100 + i}", account="tiny")).admitted
    d = e.admit(trunk_call("192.0.2.102", account="tiny"))
    assert (d.code, d.reason, d.kind, d.window) == (486, "Account Call Limit", "calls", "1d")
    assert d.retry_after in retry_between(berlin(2031, 1, 16), store.now_ms() - 5_000,
                                          store.now_ms())
    # international: 200 channels in business hours, 50 at night, 2 h at most
    intl = trunk_call("192.0.2.200", number="0044123456")
    day = e.explain(intl)
    night = e.explain(intl, at_ms=berlin(2031, 1, 15, 22))
    assert [x.max for x in day.limits if x.profile == "international"] == [200]
    assert [x.max for x in night.limits if x.profile == "international"] == [50]
    d = e.admit(intl)
    assert d.admitted and d.max_duration == 2 * 3600
    # emergency calls pass a trunk over its rate
    sos = e.admit(trunk_call(number="112"))
    assert sos.admitted and sos.bypass and sos.kind == "rate"


def test_a_changed_live_rate_starts_afresh_and_keeps_the_windows(engine_for: EngineFactory,
                                                                  store: Store) -> None:
    """An operator who lifts a strict live rate gets the policy's rate at once: the
    debt run up under the strict one is not carried over; calendar counts are."""
    e = engine_for(v2("""
  account: {rate: {max: 60, per: 1m, burst: 5}, calls: [{max: 100, per: 1d}]}
"""))
    set_clock(store, berlin(2031, 1, 15, 12))
    store.rate_limit_set("account", "acme", Rate(1, 3_600_000, 1))
    assert e.admit(acme()).admitted
    assert e.admit(acme()).kind == "rate"  # an hour owed
    assert store.rate_limit_set("account", "acme", None) == Rate(1, 3_600_000, 1)
    admitted(e, 5)  # the policy's burst, at once
    assert e.admit(acme()).kind == "rate"
    assert store.usage("account", "acme").calls == {"1d": 6}
