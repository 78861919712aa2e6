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

from dataclasses import dataclass

from conftest import STORE_TIMEOUT_MS, new_namespace, policy_text
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

from policer.call import Call
from policer.store import AdmitRequest, Member, MemoryStore, Op, RedisStore

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
limits:
  total: {max: 4, reserve_for_emergency: 1}
  international: {max: 2}
  user: {max: 2}
emergency: {class: emergency, bypass: true}
timeouts: {early: 25s, dialog: 65s}
"""
NUMBERS = {"local": "5551234", "international": "0044123", "sos-bypass": "112"}


def user(v: str) -> Member:
    return Member("user", v, max=2)


@dataclass
class Live:
    members: tuple[Member, ...]
    deadline: int  # in offset time
    state: str
    bypass: bool
    emergency: bool
    ended_at: int = 0


class StoreComparison(RuleBasedStateMachine):
    redis_url: str = ""

    @initialize()
    def setup(self) -> None:
        ns = new_namespace()
        policy = policy_text(POLICY, ns)
        self.redis = RedisStore(self.redis_url, ns, timeout_ms=STORE_TIMEOUT_MS, policy=policy)
        self.memory = MemoryStore(ns, policy=policy)
        self.offset = 0
        self.dialogs: dict[str, Live] = {}  # every dialog ever admitted, by id

    def teardown(self) -> None:
        if hasattr(self, "redis"):
            self.redis.close()

    # -- helpers
    def _set_offset(self, ms: int) -> None:
        self.offset = ms
        self.redis.clock_offset_ms = ms
        self.memory.clock_offset_ms = ms

    def _live(self) -> dict[str, Live]:
        return {d: x for d, x in self.dialogs.items()
                if x.state in ("early", "confirmed") and x.deadline > self.offset}

    def _both(self, name: str, *args: object) -> object:
        a = getattr(self.redis, name)(*args)
        b = getattr(self.memory, name)(*args)
        if name == "release" and a is not None and b is not None:
            # record ids and clocks differ by store; everything else must match
            a = (a.dialog_id, a.reason, a.profiles, a.call_id, dict(a.variables))
            b = (b.dialog_id, b.reason, b.profiles, b.call_id, dict(b.variables))
        assert a == b, f"{name}{args}: redis {a!r} != memory {b!r}"
        return a

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
        request = AdmitRequest(did, members, EARLY, emergency=emergency,
                               emergency_bypass=kind == "sos-bypass",
                               info={"call_id": did.split(";")[0], "from": who})
        r = self._both("admit", request)
        if r.admitted and not r.duplicate:
            self.dialogs[did] = Live(members, self.offset + EARLY, "early", r.bypass, emergency)

    @rule(i=st.integers(0, len(DIDS) - 1), who=st.sampled_from(USERS),
          kind=st.sampled_from(["local", "local", "international", "sos-bypass"]))
    def admit_call(self, i: int, who: str, kind: str) -> None:
        """A raw call, classified by the decision function (the model: the Python
        classifier over the same policy)."""
        call = Call.from_raw(f"call-{i}", "tag", from_user=who, from_domain="example.net",
                             ruri_user=NUMBERS[kind])
        r = self._both("admit_call", call, "n1")
        members = {"local": (TOTAL, user(who)), "international": (TOTAL, INTL, user(who)),
                   "sos-bypass": (TOTAL, EMERG, user(who))}[kind]
        if r.admitted and not r.duplicate:  # type: ignore[attr-defined]
            self.dialogs[call.dialog_id] = Live(members, self.offset + EARLY, "early",
                                                r.bypass,  # type: ignore[attr-defined]
                                                kind == "sos-bypass")

    @rule(did=st.sampled_from(DIDS), answered=st.booleans())
    def answer_and_end_in_one_batch(self, did: str, answered: bool) -> None:
        """A short call: its answer and its end reach the store in one batch."""
        ops = [Op("confirm", did, DIALOG)] if answered else []
        ops.append(Op("release", did, "bye"))
        live = did in self._live()
        got = self._both("apply", ops)
        if answered:
            assert got[0] == live
        if live:
            assert got[-1] is True
        if got[-1]:
            d = self.dialogs[did]
            d.state, d.ended_at = "ended", self.offset

    @rule()
    def tick(self) -> None:
        """A node's tick ends what passed its deadline (counted as expired)."""
        _, _, expired = self._both("tick", "n1", 0, False)  # type: ignore[misc]
        gone = [d for d, x in self.dialogs.items()
                if x.state in ("early", "confirmed") and x.deadline <= self.offset
                and x.deadline + 60_000 > self.offset]
        assert expired <= len(gone)
        for did in gone:
            self.dialogs[did].state = "ended"

    @rule(did=st.sampled_from(DIDS))
    def confirm(self, did: str) -> None:
        ok = self._both("confirm", did, DIALOG)
        expected = did in self._live()
        assert ok == expected
        if ok:
            d = self.dialogs[did]
            d.state, d.deadline = "confirmed", self.offset + DIALOG

    @rule(did=st.sampled_from(DIDS))
    def refresh(self, did: str) -> None:
        ok = self._both("refresh", did, REFRESH)
        assert ok == (did in self._live())
        if ok:
            self.dialogs[did].deadline = self.offset + REFRESH

    @rule(did=st.sampled_from(DIDS), reason=st.sampled_from(REASONS))
    def release(self, did: str, reason: str) -> None:
        rec = self._both("release", did, reason)
        if did in self._live():
            assert rec is not None
        if rec is not None:
            d = self.dialogs[did]
            d.state, d.ended_at = "ended", self.offset

    @rule(ms=st.sampled_from(JUMPS))
    def jump(self, ms: int) -> None:
        self._set_offset(self.offset + ms)

    @rule(did=st.sampled_from(DIDS), name=st.sampled_from(["x", "y"]),
          value=st.sampled_from(["1", "{a}:b"]))
    def set_var(self, did: str, name: str, value: str) -> None:
        # after a time jump the Redis record may outlive its end in script time:
        # only compare dialogs whose deadline has not passed
        if did in self._live() or did not in self.dialogs:
            assert self._both("set_var", did, name, value) == (did in self._live())

    @precondition(lambda self: bool(self._live()))
    @rule()
    def release_everything(self) -> None:
        for did in list(self._live()):
            assert self._both("release", did, "bye") is not None
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
        live = self._live()
        keys = [("total", None), ("international", None), ("emergency", None),
                *(("user", u) for u in USERS)]
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
        assert self._both("decisions") is not None
        assert self._both("ended") is not None

    @invariant()
    def limits_hold(self) -> None:
        if not hasattr(self, "redis"):
            return
        live = self._live()
        for m in (TOTAL, INTL, user("alice"), user("bob")):
            inside = [d for d in live.values() if m in d.members]
            # only bypassed emergency calls may go over the max ...
            assert sum(1 for d in inside if not d.bypass) <= m.max
            # ... and ordinary calls never use the emergency reserve
            assert sum(1 for d in inside if not d.emergency) <= m.max - m.reserve

    def everything_ends(self) -> None:
        """After every deadline, nothing counts in either store."""
        self._set_offset(self.offset + DIALOG + REFRESH + EARLY)
        assert self._live() == {}
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
