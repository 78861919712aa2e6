"""Random admit / confirm / refresh / release / time-jump sequences against the
Redis store, checked step by step against the in-process store (the model),
with the invariants of the issue:

- both stores decide the same and count the same;
- no profile holds more than its max, except for emergency calls admitted by
  bypass (and ordinary calls never eat into the emergency reserve);
- every count equals the dialogs the test knows to be live;
- everything is back to zero after all releases, or after every deadline.

Time moves only through ``clock_offset_ms``, in steps that keep deadlines 5 s
away from any point the test looks at, so real time spent running the test
cannot change an outcome.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from policer.calendar import LocalClock
from policer.call import Call
from policer.policy import Rate
from policer.store import AdmitRequest, Member, MemoryStore, Op
from policer.store.base import CallResult, Usage
from policer.store.keys import dialog_id
from tests.support import STORE_TIMEOUT_MS, new_namespace, policy_text
from tests.support.explicit import ExplicitRedisStore

EARLY = 25_000
DIALOG = 65_000
REFRESH = 45_000
JUMPS = [10_000, 20_000, 30_000, 70_000]  # multiples of 10 s; timeouts end in 5 s

TOTAL = Member("total", max=4, reserve=1)
INTL = Member("international", max=2)
EMERG = Member("emergency")
USERS = ("alice", "bob")
DIDS = [f"call-{i};tag" for i in range(12)]
REASONS = ("bye", "cancel", "failed", "timeout")


#: The same profiles as policy: what the decision function classifies raw calls into.
POLICY = """
version: 1
namespace: stateful
classes:
  emergency: {numbers: ["112"]}
  international: {prefixes: ["00"]}
  local: {default: true}
profiles:
  total: {}
  international: {when: {class: international}}
  emergency: {when: {class: emergency}}
  user: {value: from_user}
  trunk: {value: gateway}
limits:
  total: {max: 4, reserve_for_emergency: 1}
  international: {max: 2}
  user: {max: 2}
  trunk: {max: 1}
emergency: {class: emergency, bypass: true}
timeouts: {early: 25s, dialog: 65s}
"""
NUMBERS = {"local": "5551234", "international": "0044123", "sos-bypass": "112"}


def user(v: str) -> Member:
    return Member("user", v, max=2)


#: The one gateway raw calls may carry: a full gateway never rejects a call, the call is
#: admitted without it (the admit's egress)
TRUNK = Member("trunk", "gw1:5060", max=1)


@dataclass
class Live:
    members: tuple[Member, ...]
    deadline: int  # in offset time
    state: str
    bypass: bool
    emergency: bool
    ended_at: int = 0
    md: int = 0  # max duration (ms) once answered; 0 none
    cap: int = 0  # answered: the deadline never passes this (offset time)


class StoreComparison(RuleBasedStateMachine):
    redis_url: str = ""
    policy_yaml: str = POLICY

    @initialize()
    def setup(self) -> None:
        ns = new_namespace()
        policy = policy_text(self.policy_yaml, ns)
        self.redis = ExplicitRedisStore(self.redis_url, ns, timeout_ms=STORE_TIMEOUT_MS,
                                        policy=policy)
        self.memory = MemoryStore(ns, policy=policy)
        self.offset = 0
        self.dialogs: dict[str, Live] = {}  # every dialog ever admitted, by id
        self.decided: Counter[tuple[str, str]] = Counter()  # (outcome, profile) -> calls
        self.ends: Counter[str] = Counter()  # reason -> dialogs ended by a release
        self.swept = 0  # dialogs a tick ended (expired or duration_cap)

    def teardown(self) -> None:
        if hasattr(self, "redis"):
            self.redis.close()

    # -- helpers
    def _set_offset(self, ms: int) -> None:
        self.offset = ms
        self.redis.clock_offset_ms = ms
        self.memory.clock_offset_ms = ms

    def _live(self) -> dict[str, Live]:
        """The calls that are up: not ended, deadline ahead."""
        return {d: x for d, x in self.dialogs.items()
                if x.state in ("early", "confirmed") and x.deadline > self.offset}

    def _counted(self) -> dict[str, Live]:
        """What the stores count: every dialog not ended yet (past its deadline it counts
        until a tick's sweep ends it, or until it is forgotten)."""
        return {d: x for d, x in self.dialogs.items() if x.state in ("early", "confirmed")}

    def _touch(self, did: str) -> None:
        """A dialog id is used again: a record that outlived its end in script time (60 s
        after its deadline, only when the test moves the clock) is forgotten then, in
        both stores, and stops counting."""
        d = self.dialogs.get(did)
        if d is not None and d.state in ("early", "confirmed") \
                and d.deadline + 60_000 <= self.offset:
            d.state = "forgotten"

    def _same(self, a: object, b: object) -> bool:
        return a == b

    def _both(self, name: str, *args: object) -> Any:
        a = getattr(self.redis, name)(*args)
        b = getattr(self.memory, name)(*args)
        if name == "release" and a is not None and b is not None:
            # record ids and clocks differ by store; everything else must match
            a = (a.dialog_id, a.reason, a.profiles, a.call_id, dict(a.variables))
            b = (b.dialog_id, b.reason, b.profiles, b.call_id, dict(b.variables))
        if name == "tick":  # the state epoch's id is each store's own
            a, b = a[:3], b[:3]
        assert self._same(a, b), f"{name}{args}: redis {a!r} != memory {b!r}"
        return a

    def _admitted_call(self, call: Call, who: str, kind: str, r: CallResult) -> None:
        """A decision of ``admit_call`` (a subclass checks it against its own books)."""

    def _decided(self, admitted: bool, tripped: str | None, bypass: bool,
                 profiles: list[str]) -> None:
        """What the decision counters must add for one new (not duplicate) decision."""
        if not admitted:
            assert tripped is not None
            self.decided["rejected", tripped] += 1
            return
        for p in profiles:
            self.decided["bypassed" if bypass and p == tripped else "admitted", p] += 1

    # -- rules
    @rule(did=st.sampled_from(DIDS), who=st.sampled_from(USERS),
          kind=st.sampled_from(["local", "local", "international", "sos", "sos-bypass"]))
    def admit(self, did: str, who: str, kind: str) -> None:
        emergency = kind.startswith("sos")
        members: tuple[Member, ...]
        if kind == "international":
            members = (TOTAL, INTL, user(who))
        elif emergency:
            members = (TOTAL, EMERG)
        else:
            members = (TOTAL, user(who))
        self._touch(did)
        request = AdmitRequest(did, members, EARLY, emergency=emergency,
                               emergency_bypass=kind == "sos-bypass",
                               info={"call_id": did.split(";")[0], "from": who})
        r = self._both("admit", request)
        if not r.duplicate:
            self._decided(r.admitted, members[r.tripped].profile if r.tripped >= 0 else None,
                          r.bypass, [m.profile for m in members])
        if r.admitted and not r.duplicate:
            self.dialogs[did] = Live(members, self.offset + EARLY, "early", r.bypass, emergency)

    @rule(i=st.integers(0, len(DIDS) - 1), who=st.sampled_from(USERS),
          kind=st.sampled_from(["local", "local", "international", "sos-bypass"]),
          gateway=st.booleans())
    def admit_call(self, i: int, who: str, kind: str, gateway: bool) -> None:
        """A raw call, classified by the decision function (the model: the Python
        classifier over the same policy); with a gateway, its first attempt is decided
        with it."""
        call = Call.from_raw(f"call-{i}", "tag", from_user=who, from_domain="example.net",
                             ruri_user=NUMBERS[kind],
                             gateway=TRUNK.value if gateway else None)
        self._touch(dialog_id(call.call_id, call.from_tag))
        r = self._both("admit_call", call, "n1")
        assert isinstance(r, CallResult)
        members = {"local": (TOTAL, user(who)), "international": (TOTAL, INTL, user(who)),
                   "sos-bypass": (TOTAL, EMERG, user(who))}[kind]
        if f"trunk={TRUNK.value}" in r.memberships:
            members = (*members, TRUNK)
        self._admitted_call(call, who, kind, r)
        if not r.duplicate:
            self._decided(r.admitted, r.limit, r.bypass,
                          [label.partition("=")[0] for label in r.memberships])
            # the gateway decided with the call: taken when it had room (or the call is
            # an emergency one, over it), never the reason a call is rejected
            assert (r.egress is not None) == (gateway and r.admitted
                                              and "trunk:" in self.policy_yaml)
            if r.egress is not None and not r.egress.taken:
                assert (r.egress.limit, r.egress.kind) == ("trunk", "concurrent")
                self.decided["egress_full", "trunk"] += 1
        if r.admitted and not r.duplicate:
            did = dialog_id(call.call_id, call.from_tag)
            self.dialogs[did] = Live(members, self.offset + EARLY, "early", r.bypass,
                                     kind == "sos-bypass", md=r.max_duration_ms or 0)

    @rule(did=st.sampled_from(DIDS), answered=st.booleans())
    def answer_and_end_in_one_batch(self, did: str, answered: bool) -> None:
        """A short call: its answer and its end reach the store in one batch."""
        self._touch(did)
        ops = [Op("confirm", did, DIALOG)] if answered else []
        ops.append(Op("release", did, "bye"))
        live = did in self._live()
        got = self._both("apply", ops)
        if answered:
            assert got[0] == live
        if live:
            assert got[-1] is True
        if got[-1]:
            self.ends["bye"] += 1
            d = self.dialogs[did]
            d.state, d.ended_at = "ended", self.offset

    @rule()
    def tick(self) -> None:
        """A node's tick ends what passed its deadline (counted as expired)."""
        _, _, expired = self._both("tick", "n1", 0, False)
        gone = [d for d, x in self.dialogs.items()
                if x.state in ("early", "confirmed") and x.deadline <= self.offset
                and x.deadline + 60_000 > self.offset]
        assert expired <= len(gone)
        self.swept += expired
        for x in self.dialogs.values():  # ended, or forgotten (outlived in script time)
            if x.state in ("early", "confirmed") and x.deadline <= self.offset:
                x.state = "ended"

    @rule(did=st.sampled_from(DIDS))
    def confirm(self, did: str) -> None:
        self._touch(did)
        ok = self._both("confirm", did, DIALOG)
        expected = did in self._live()
        assert ok == expected
        if ok:
            d = self.dialogs[did]
            if d.md and not d.cap:  # answered: it ends at answer + max duration at the latest
                d.cap = self.offset + d.md
            d.state, d.deadline = "confirmed", self.offset + DIALOG
            if d.cap:
                d.deadline = min(d.deadline, d.cap)

    @rule(did=st.sampled_from(DIDS))
    def refresh(self, did: str) -> None:
        self._touch(did)
        ok = self._both("refresh", did, REFRESH)
        assert ok == (did in self._live())
        if ok:
            d = self.dialogs[did]
            d.deadline = self.offset + REFRESH
            if d.cap:
                d.deadline = min(d.deadline, d.cap)

    @rule(did=st.sampled_from(DIDS), reason=st.sampled_from(REASONS))
    def release(self, did: str, reason: str) -> None:
        self._touch(did)
        rec = self._both("release", did, reason)
        if did in self._live():
            # the call-end record: this dialog, this reason, every profile it counted in
            assert rec is not None
            rec_did, rec_reason, rec_profiles, _, _ = rec
            assert (rec_did, rec_reason) == (did, reason)
            assert sorted(rec_profiles) == sorted(
                m.profile if m.value is None else f"{m.profile}={m.value}"
                for m in self.dialogs[did].members)
        if rec is not None:
            self.ends[reason] += 1
            d = self.dialogs[did]
            d.state, d.ended_at = "ended", self.offset

    @rule(ms=st.sampled_from(JUMPS))
    def jump(self, ms: int) -> None:
        self._set_offset(self.offset + ms)

    @rule(did=st.sampled_from(DIDS), name=st.sampled_from(["x", "y"]),
          value=st.sampled_from(["1", "{a}:b"]))
    def set_var(self, did: str, name: str, value: str) -> None:
        self._touch(did)
        assert self._both("set_var", did, name, value) == (did in self._counted())

    @precondition(lambda self: bool(self._counted()))
    @rule()
    def release_everything(self) -> None:
        for did in list(self._counted()):
            self._touch(did)
            if self.dialogs[did].state == "forgotten":
                self._both("release", did, "bye")  # forgotten on access: nothing to end
                continue
            rec = self._both("release", did, "bye")
            assert rec is not None and rec[:2] == (did, "bye")
            self.ends["bye"] += 1
            self.dialogs[did].state = "ended"
        self.check_counts()
        for s in (self.redis, self.memory):
            assert s.profile_size("total") == 0
            assert s.stats()["active"] == 0

    # -- invariants
    @invariant()
    def check_counts(self) -> None:
        if not hasattr(self, "redis"):
            return
        live = self._counted()
        keys = [("total", None), ("international", None), ("emergency", None),
                *(("user", u) for u in USERS), ("trunk", TRUNK.value)]
        for profile, value in keys:
            expected = sum(1 for d in live.values()
                           if any(m.profile == profile and m.value == value for m in d.members))
            assert self.redis.profile_size(profile, value) == expected, (profile, value)
            assert self.memory.profile_size(profile, value) == expected, (profile, value)
        assert self._both("profile_values", "user") == {
            u: n for u in USERS
            if (n := sum(1 for d in live.values() if user(u) in d.members))}
        rs, ms = self.redis.stats(), self.memory.stats()
        assert rs == ms
        assert rs["active"] == len(live)
        assert rs["confirmed"] == sum(1 for d in live.values() if d.state == "confirmed")
        assert self._both("decisions") == {k: n for k, n in self.decided.items() if n}
        ended = self._both("ended")
        assert isinstance(ended, dict)
        assert {r: n for r, n in ended.items() if r in REASONS} == \
            {r: n for r, n in self.ends.items() if n}
        assert ended.get("expired", 0) + ended.get("duration_cap", 0) == self.swept

    @invariant()
    def limits_hold(self) -> None:
        if not hasattr(self, "redis"):
            return
        live = self._live()
        for m in (TOTAL, INTL, user("alice"), user("bob"), TRUNK):
            inside = [d for d in live.values() if m in d.members]
            # only bypassed emergency calls may go over the max ...
            assert sum(1 for d in inside if not d.bypass) <= m.max
            # ... and ordinary calls never use the emergency reserve
            assert sum(1 for d in inside if not d.emergency) <= m.max - m.reserve

    def everything_ends(self) -> None:
        """After every deadline and a tick, nothing counts in either store."""
        self._set_offset(self.offset + DIALOG + REFRESH + EARLY)
        assert self._live() == {}
        for _ in range(5):  # (each call ends a bounded batch)
            self.tick()
        assert self._counted() == {}
        self.check_counts()
        for s in (self.redis, self.memory):
            assert s.profile_size("total") == 0
            assert s.profile_values("user") == {}
            assert s.stats()["active"] == 0


def test_redis_store_matches_the_in_process_model(redis_url: str) -> None:
    class Machine(StoreComparison):
        def teardown(self) -> None:
            if hasattr(self, "redis"):
                self.everything_ends()
            super().teardown()

    Machine.redis_url = redis_url
    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


# ----------------------------------------------------------------------------- policy v2

#: The same profiles with call rates, calendar windows, a schedule and a max duration.
#: The rates' emission interval T = 12.44 s is chosen so that no multiple of it up to
#: 40 T comes within 240 ms of a multiple of 10 s (the steps time moves in): a call
#: never arrives just when a token does, so the milliseconds between the two stores'
#: clocks cannot decide a rate. Windows and schedules change on whole minutes; the
#: clock stays 5 s past them.
POLICY_V2 = """
version: 2
namespace: stateful
timezone: Europe/Berlin
classes:
  emergency: {numbers: ["112"]}
  international: {prefixes: ["00"]}
  local: {default: true}
schedules:
  business: {days: [mon, tue, wed, thu, fri], hours: "08:00-18:00"}
profiles:
  total: {}
  international: {when: {class: international}}
  emergency: {when: {class: emergency}}
  user: {value: from_user}
limits:
  total: {max: 4, reserve_for_emergency: 1, calls: [{max: 6, per: 1m}]}
  international:
    - {max: 2, schedule: business, rate: {max: 1, per: 12440ms, burst: 1}}
    - {max: 1, rate: {max: 1, per: 12440ms, burst: 1}}
  user:
    max: 2
    rate: {max: 1, per: 12440ms, burst: 3}
    calls: [{max: 5, per: 1h}, {max: 8, per: 1d}]
    max_duration: 55s
    rate_reject: {code: 503, reason: "Call Rate Exceeded"}
emergency: {class: emergency, bypass: true}
timeouts: {early: 25s, dialog: 65s}
"""
T_MS = 12_440
INTL_BURST = 1
#: Wednesday 2031-01-15 12:00:05 in Berlin: every instant the test looks at is this
#: plus a multiple of 10 s
START = 1_926_241_205_000
WINDOWS = {"total": {"1m": 6}, "user": {"1h": 5, "1d": 8}}
BOUNDARIES = ("1m", "1h", "1d")
CLOCK = LocalClock("Europe/Berlin")
DRIFT_MS = 60


def _real_ms() -> int:
    return int(time.time() * 1000)


class RatesAndWindows(StoreComparison):
    """The comparison with rates, calendar windows, schedules and max durations: clock
    jumps across window boundaries and pauses that refill a burst, live rate and window
    caps, usage and explain. Both stores' clocks are set to START + the test's time at
    every jump and run on from there (a store's clock never goes back: GCRA needs
    that); when the real time spent at one instant nears the rates' margin, time jumps
    10 s (:meth:`keep_the_clock_near`).

    Its own books check the rule itself, not only Redis against the model: an
    ordinary call is admitted only while its windows hold fewer than their max, a
    window rejection names a full window, the international rate never lets more
    through than its burst plus the tokens time made, and every window count the
    stores show is the calls admitted in it."""

    policy_yaml = POLICY_V2

    @initialize()
    def setup(self) -> None:
        super().setup()
        self.windows: dict[tuple[str, str, str, int], int] = {}  # admitted per window
        self.live_caps: dict[tuple[str, str], int] = {}  # (user, per) -> live max
        self.intl_times: list[int] = []  # ordinary international admits (offset time)
        self._set_offset(0)

    def _set_offset(self, ms: int) -> None:
        self.offset = ms
        self.anchored = _real_ms()
        off = START + ms - self.anchored
        self.redis.clock_offset_ms = off
        self.memory.clock_offset_ms = off

    def _same(self, a: object, b: object) -> bool:
        # a Retry-After is rounded up from milliseconds: the stores' clocks may differ by
        # a few, so it may differ by one second; a rate's usage is a fraction of the same
        if isinstance(a, CallResult) and isinstance(b, CallResult):
            ra, rb = a.retry_after, b.retry_after
            if ra is not None and rb is not None and a.kind == "rate" and abs(ra - rb) <= 1:
                b = replace(b, retry_after=ra)
        if isinstance(a, Usage) and isinstance(b, Usage) and a.rate is not None \
                and b.rate is not None and abs(a.rate - b.rate) < 0.02:
            b = replace(b, rate=a.rate)
        return a == b

    def _now(self) -> int:
        return START + self.offset

    # -- the books
    def _admitted_call(self, call: Call, who: str, kind: str, r: CallResult) -> None:
        now = self._now()
        if r.duplicate:
            return
        if not r.admitted and r.kind == "calls":
            assert r.limit is not None and r.window in WINDOWS[r.limit]
            value = who if r.limit == "user" else ""
            wid = CLOCK.window(r.window, now)[0]
            n = self.windows.get((r.limit, value, r.window, wid), 0)
            assert (r.count, r.max) == (n, self._window_max(r.limit, value, r.window))
            assert n >= r.max
        if not r.admitted:
            return
        for label in r.memberships:
            profile, _, value = label.partition("=")
            for per in WINDOWS.get(profile, {}):
                key = (profile, value, per, CLOCK.window(per, now)[0])
                n = self.windows.get(key, 0)
                if not r.bypass:  # never more ordinary calls in a window than its max
                    assert n < self._window_max(profile, value, per), (key, n)
                self.windows[key] = n + 1
        if "international" in r.memberships and not r.bypass:
            self.intl_times.append(self.offset)
            t = self.intl_times
            for i in range(len(t)):  # GCRA: at most burst + what time regenerated
                assert len(t) - i <= INTL_BURST + (t[-1] - t[i] + DRIFT_MS) / T_MS, t
        assert r.max_duration_ms == 55_000

    def _window_max(self, profile: str, value: str, per: str) -> int:
        return self.live_caps.get((value, per), WINDOWS[profile][per]) if value \
            else WINDOWS[profile][per]

    # -- rules
    @rule(calls=st.lists(st.tuples(st.integers(0, len(DIDS) - 1), st.sampled_from(USERS),
                                   st.sampled_from(["local", "international", "sos-bypass"])),
                         min_size=2, max_size=6))
    def burst(self, calls: list[tuple[int, str, str]]) -> None:
        """Calls at one instant: bursts that trip rates and fill windows."""
        for i, who, kind in calls:
            self.keep_the_clock_near()
            self.admit_call(i, who, kind, False)

    @rule(per=st.sampled_from(BOUNDARIES))
    def jump_across(self, per: str) -> None:
        """To 5 s after the next boundary of a calendar window."""
        end = CLOCK.window(per, self._now())[1]
        self._set_offset(end + 5_000 - START)

    @rule(ms=st.sampled_from([40_000, 130_000]))
    def pause(self, ms: int) -> None:
        """Long enough for the rates' bursts to refill (partly, wholly)."""
        self._set_offset(self.offset + ms)

    @rule(who=st.sampled_from(USERS), burst=st.sampled_from([None, 1, 2]))
    def live_rate(self, who: str, burst: int | None) -> None:
        rate = None if burst is None else Rate(1, T_MS, burst)
        self._both("rate_limit_set", "user", who, rate)

    @rule(who=st.sampled_from(USERS), per=st.sampled_from(["1h", "1d"]),
          mx=st.sampled_from([None, 0, 2, 4]))
    def live_window(self, who: str, per: str, mx: int | None) -> None:
        old = self._both("calls_limit_set", "user", who, per, mx)
        assert old == self.live_caps.get((who, per))
        if mx is None:
            self.live_caps.pop((who, per), None)
        else:
            self.live_caps[(who, per)] = mx

    @rule(i=st.integers(0, len(DIDS) - 1), who=st.sampled_from(USERS),
          kind=st.sampled_from(["local", "international", "sos-bypass"]),
          hours=st.sampled_from([None, 0, 11, 24 * 3 + 3]))
    def explain(self, i: int, who: str, kind: str, hours: int | None) -> None:
        """The dry run, now or at another instant (a night, a weekend): the same on both
        stores, and it changes nothing."""
        call = Call.from_raw(f"call-{i}", "tag", from_user=who, from_domain="example.net",
                             ruri_user=NUMBERS[kind])
        at = None if hours is None else self._now() + hours * 3_600_000
        before = self._both("stats")
        r = self._both("explain_call", call, at)
        assert isinstance(r, CallResult)
        if kind == "international" and at is not None:
            rows = [x for x in r.rows if x.profile == "international"]
            business = CLOCK.minute_of_week(at) % 1440 in range(480, 1080) \
                and CLOCK.minute_of_week(at) < 5 * 1440
            assert [x.max for x in rows] == [2 if business else 1]
        assert self._both("stats") == before

    # -- invariants
    @invariant()
    def keep_the_clock_near(self) -> None:
        """The stores' clocks run ahead of the test's time by the real time spent since
        the last jump: well below the rates' 240 ms margin, or time jumps 10 s."""
        if hasattr(self, "redis") and _real_ms() - self.anchored > DRIFT_MS:
            self._set_offset(self.offset + 10_000)

    @invariant()
    def usage_is_what_was_admitted(self) -> None:
        if not hasattr(self, "redis"):
            return
        now = self._now()
        for profile, value in (("total", None), ("international", None),
                               *(("user", u) for u in USERS)):
            u = self._both("usage", profile, value)
            assert isinstance(u, Usage)
            expected = {per: self.windows.get((profile, value or "", per,
                                               CLOCK.window(per, now)[0]), 0)
                        for per in WINDOWS.get(profile, {})}
            assert dict(u.calls) == expected, (profile, value)

    def everything_ends(self) -> None:
        super().everything_ends()
        # and after every window, every count and every rate is back to zero
        self._set_offset(self.offset + 2 * 86_400_000)
        for profile, value in (("total", None), ("international", None),
                               *(("user", u) for u in USERS)):
            u = self._both("usage", profile, value)
            assert isinstance(u, Usage)
            assert all(n == 0 for n in u.calls.values()), (profile, u)
            assert u.rate in (None, 0.0), (profile, u)
        self._both("tick", "n1", 0, False)  # the sweep of stale rate and window state
        assert self._both("usage", "user", "alice") == Usage(0.0, {"1h": 0, "1d": 0})


def test_redis_matches_the_model_with_rates_windows_and_schedules(redis_url: str) -> None:
    class Machine(RatesAndWindows):
        def teardown(self) -> None:
            if hasattr(self, "redis"):
                self.everything_ends()
            super().teardown()

    Machine.redis_url = redis_url
    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
