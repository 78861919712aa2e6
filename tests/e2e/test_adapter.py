"""The Kamailio adapter without Kamailio: a real engine over the in-process store,
and a fake ``KSR`` module (KSR only exists inside Kamailio) with the mqueue and
htables the adapter uses.

Fast (no processes): what a caller sees when the adapter decides (the reply
code, reason and Retry-After sent, or the relay), how dialog events are queued
and applied in batches, what the native flavour's timer process writes for the
cfg (fallback htables, metrics from the cfg's counters), including the failures
the end-to-end tests cannot provoke on purpose. Not marked e2e.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from policer.adapters import kamailio as adapter
from policer.adapters import kamailio_ksr, kamailio_native, kamailio_queue
from policer.adapters.kamailio_cfg import bucket_counter, sum_counter
from policer.call import Call
from policer.classify import Classifier
from policer.engine import Engine
from policer.metrics import WorkerMetrics
from policer.policy import NumberClass, Policy, parse_policy
from policer.store import MemoryStore, StoreError
from tests.support import wait_for

POLICY = """
version: 1
namespace: adapter
call:
  attributes: {account: "header:X-Account"}
classes:
  emergency: {numbers: ["112"], prefixes: ["99"]}
  local: {prefixes: ["991"], default: true}
profiles:
  total: {}
  account: {value: account}
limits:
  total: {max: 10}
  account: {max: 1, reject: {code: 486, reason: "Account Call Limit", retry_after: 30}}
emergency: {class: emergency, bypass: true}
reject: {code: 503, reason: "Call Limit Reached", retry_after: 7}
on_store_error: reject
"""


class FakeKSR(types.ModuleType):
    """The few KSR functions the adapter uses, recording what it sends."""

    def __init__(self) -> None:
        super().__init__("KSR")
        self.values: dict[str, Any] = {}
        self.headers: dict[str, str] = {}
        self.vars: dict[str, Any] = {}
        self.replies: list[tuple[int, str, list[str]]] = []
        self.logged: list[tuple[str, str]] = []
        self.queue: deque[str] = deque()
        self.fetched: str | None = None
        self.tables: dict[str, dict[str, int | str]] = {}
        self._appended: list[str] = []
        self.pv = types.SimpleNamespace(get=self._pv_get, sets=self.vars.__setitem__,
                                        seti=self.vars.__setitem__)
        self.hdr = types.SimpleNamespace(get=lambda n: self.headers.get(n.lower()),
                                         append_to_reply=self._appended.append)
        self.sl = types.SimpleNamespace(send_reply=self._reply)
        self.dialog_calls: list[tuple[Any, ...]] = []
        self.dialog = types.SimpleNamespace(
            dlg_manage=lambda: self.dialog_calls.append(("dlg_manage",)),
            dlg_set_timeout=lambda t: self.dialog_calls.append(("dlg_set_timeout", t)),
            dlg_set_property=lambda p: self.dialog_calls.append(("dlg_set_property", p)))
        self.mqueue = types.SimpleNamespace(mq_add=self._mq_add, mq_fetch=self._mq_fetch,
                                            mqv_get=lambda q: self.fetched,
                                            mq_size=lambda q: len(self.queue))
        self.htable = types.SimpleNamespace(
            sht_seti=self._sht_set, sht_sets=self._sht_set,
            sht_rm=lambda t, k: self.tables.get(t, {}).pop(k, None))
        for level in ("err", "warn", "notice", "info", "dbg"):
            setattr(self, level, lambda msg, _l=level: self.logged.append((_l, msg)))

    def _pv_get(self, name: str) -> Any:
        if name.startswith("$mq_size("):
            return len(self.queue)
        if name.startswith("$dlg_var("):  # kept with the dialog: what the adapter set
            return self.vars.get(name)
        if name.startswith("$sht(") and "=>" in name:
            table, key = name[5:-1].split("=>", 1)
            return self.tables.get(table, {}).get(key)
        return self.values.get(name)

    def _sht_set(self, table: str, key: str, value: int | str) -> int:
        self.tables.setdefault(table, {})[key] = value
        return 1

    def _mq_add(self, queue: str, key: str, value: str) -> int:
        assert queue == adapter.QUEUE and isinstance(value, str)
        self.queue.append(value)
        return 1

    def _mq_fetch(self, queue: str) -> int:
        if not self.queue:
            self.fetched = None
            return -2
        self.fetched = self.queue.popleft()
        return 1

    def _reply(self, code: int, reason: str) -> None:
        self.replies.append((code, reason, list(self._appended)))
        self._appended.clear()

    def invite(self, call_id: str, user: str = "alice", account: str = "acme",
               number: str = "5551234") -> None:
        self.values.clear()
        self.values.update({"$ci": call_id, "$ft": f"tag-{call_id}", "$fU": user,
                            "$fd": "example.net", "$rU": number, "$tU": number,
                            "$si": "127.0.0.1", "$rm": "INVITE"})
        self.headers = {"x-account": account} if account else {}
        self.vars.clear()

    def in_dialog(self, call_id: str, method: str, status: str | None = None) -> None:
        """A dialog event: $dlg names the dialog; the message may come from the callee."""
        self.values.clear()
        self.values.update({"$ci": call_id, "$ft": "callee-tag", "$rm": method, "$rs": status,
                            "$dlg(callid)": call_id, "$dlg(from_tag)": f"tag-{call_id}"})


@pytest.fixture
def ksr() -> Iterator[FakeKSR]:
    fake = FakeKSR()
    sys.modules["KSR"] = fake
    kamailio_ksr._module = None
    kamailio_queue._held = kamailio_queue._Held()
    try:
        yield fake
    finally:
        sys.modules.pop("KSR", None)
        kamailio_ksr._module = None
        kamailio_native._native = None
        adapter.set_engine_factory(None)


@pytest.fixture
def engine(ksr: FakeKSR) -> Engine:
    policy = parse_policy(POLICY)
    real = Engine(policy, MemoryStore(policy.namespace), node="test-node")
    adapter.set_engine_factory(lambda: real)
    return real


def test_admitted_invite_is_relayed_and_counted(ksr: FakeKSR, engine: Engine) -> None:
    ksr.invite("c1")
    verdict = adapter.admit_current()
    assert (verdict.admitted, verdict.code) == (True, 200)
    # the call's attributes, kept with Kamailio's dialog for `policer reconcile`
    assert Call.from_json("c1", "x", verdict.call_json).headers == {"x-account": "acme"}
    assert ksr.replies == []
    assert engine.store.profile_size("account", "acme") == 1
    assert engine.store.profile_size("total") == 1


def test_rejection_reply_with_retry_after(ksr: FakeKSR, engine: Engine) -> None:
    ksr.invite("c1")
    assert adapter.admit_current().admitted
    ksr.invite("c2")
    verdict = adapter.admit_current()
    assert (verdict.admitted, verdict.code, verdict.reason, verdict.retry_after) == (
        False, 486, "Account Call Limit", 30)
    assert verdict.call_json == ""
    for i in range(9):
        ksr.invite(f"f{i}", user=f"u{i}", account="")
        assert adapter.admit_current().admitted
    ksr.invite("c4", account="")
    adapter.reject_current(adapter.admit_current())
    assert ksr.replies == [(503, "Call Limit Reached", ["Retry-After: 7\r\n"])]


@pytest.mark.parametrize(
    ("event", "method", "status", "reason"),
    [
        ("dialog:end", "BYE", None, "bye"),
        ("dialog:end", "OPTIONS", None, "timeout"),  # Kamailio's timeout: a faked message
        ("dialog:failed", "INVITE", "486", "failed"),
        ("dialog:failed", "INVITE", "487", "cancel"),
        ("dialog:failed", "CANCEL", None, "cancel"),
    ],
)
def test_dialog_events_are_queued_then_applied_with_their_reason(
    ksr: FakeKSR, engine: Engine, event: str, method: str, status: str | None, reason: str
) -> None:
    ksr.invite("c1")
    assert adapter.admit_current().admitted
    if event == "dialog:end":
        ksr.in_dialog("c1", "INVITE", "200")
        assert adapter.dialog_event("dialog:start") == adapter.OK
        assert engine.store.stats()["confirmed"] == 0  # queued, not applied by the worker
        assert adapter.flush() == 1
        assert engine.store.stats()["confirmed"] == 1
    ksr.in_dialog("c1", method, status)  # e.g. a BYE from the callee: tags reversed
    assert adapter.dialog_event(event) == adapter.OK
    assert engine.store.profile_size("total") == 1 and len(ksr.queue) == 1
    assert adapter.timer() == adapter.OK  # the 100 ms timer: flush (and the tick)
    assert engine.store.profile_size("total") == 0 and not ksr.queue
    (record,) = engine.store.call_records()
    assert (record.call_id, record.reason) == ("c1", reason)


@pytest.mark.parametrize(("max_duration", "capped"), [("2s", 2), ("2m", None), (None, None)])
def test_a_max_duration_within_the_dialog_timeout_ends_the_call_as_duration_cap(
        ksr: FakeKSR, monkeypatch: pytest.MonkeyPatch, max_duration: str | None,
        capped: int | None) -> None:
    monkeypatch.delenv("POLICER_DIALOG_TIMEOUT", raising=False)
    cap = f"total: {{max: 10, max_duration: {max_duration}}}" if max_duration else ""
    policy = parse_policy(POLICY.replace("total: {max: 10}", cap or "total: {max: 10}")
                          + "timeouts: {dialog: 60s}\n")
    eng = Engine(policy, MemoryStore(policy.namespace), node="test-node")
    adapter.set_engine_factory(lambda: eng)
    ksr.invite("c1")
    verdict = adapter.admit_current()
    assert verdict.admitted
    adapter.manage_current(verdict)
    if capped:
        # Kamailio times the answered dialog out at the cap and sends BYEs to both sides;
        # in-dialog requests do not push that on
        assert ksr.dialog_calls == [("dlg_manage",), ("dlg_set_timeout", capped),
                                    ("dlg_set_property", "timeout-noreset")]
        assert ksr.vars["$dlg_ctx(timeout_bye)"] == 1
        assert ksr.vars["$dlg_ctx(timeout_route)"] == adapter.DURATION_CAP_ROUTE
    else:  # no cap, or one past the dialog timeout: the dialog times out as before
        assert ksr.dialog_calls == [("dlg_manage",)]
        assert not any(k.startswith("$dlg_ctx(") for k in ksr.vars)
    ksr.in_dialog("c1", "INVITE", "200")
    adapter.dialog_event("dialog:start")
    adapter.flush()
    # the dialog module's timeout: its timeout route (capped calls only), then the end
    # event, both with a faked message
    ksr.in_dialog("c1", "OPTIONS")
    if capped:
        assert adapter.dialog_event("dialog:timeout") == adapter.OK
    adapter.dialog_event("dialog:end")
    adapter.timer()
    assert eng.store.profile_size("total") == 0
    (record,) = eng.store.call_records()
    assert record.reason == ("duration_cap" if capped else "timeout")


def test_events_go_in_batches_and_a_refused_batch_is_kept(
        ksr: FakeKSR, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        ksr.invite(f"b{i}", user=f"u{i}", account="")
        assert adapter.admit_current().admitted
    for i in range(5):
        ksr.in_dialog(f"b{i}", "BYE")
        adapter.dialog_event("dialog:end")
    calls: list[bytes] = []
    real = engine.store.apply_packed

    def down(packed: bytes) -> int:
        calls.append(packed)
        raise StoreError("ConnectionError: down")

    monkeypatch.setattr(engine.store, "apply_packed", down)
    assert adapter.flush(max_ops=2) == 0
    assert len(calls) == 1 and len(ksr.queue) == 3  # kept; the rest waits in the queue
    assert adapter.flush(max_ops=2) == 0
    assert calls[1] == calls[0]  # the same batch again, first
    assert sum("store_error" in m for _, m in ksr.logged) == 1  # once per failure streak
    monkeypatch.setattr(engine.store, "apply_packed", real)
    assert adapter.flush(max_ops=2) == 5  # three batches: 2 + 2 + 1
    assert engine.store.profile_size("total") == 0 and not ksr.queue


def test_fallback_admissions_reach_the_timer_queue(
        ksr: FakeKSR, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call the fallback admitted (an emergency number while Redis is down) is
    counted once the store answers, by the timer: not at this worker's next call."""

    def down(call: Call, node: str, record: bool = False) -> Any:
        raise StoreError("ConnectionError: down")

    monkeypatch.setattr(engine.store, "admit_call", down)
    monkeypatch.setattr(engine.store, "pack_ops", lambda ops: b"a" + b"x" * len(ops),
                        raising=False)
    ksr.invite("e1", number="112")
    verdict = adapter.admit_current()
    assert verdict.admitted and verdict.code == 200
    ksr.invite("n1", number="5550")
    assert not adapter.admit_current().admitted  # on_store_error: reject
    assert list(ksr.queue) == ["ax"] and not engine.pending


def test_failures_answer_500_and_never_raise(ksr: FakeKSR, engine: Engine) -> None:
    def broken() -> Engine:
        raise OSError("no policy file")

    adapter.set_engine_factory(broken)
    ksr.invite("c1")
    verdict = adapter.admit_current()
    assert (verdict.admitted, verdict.code) == (False, 500)
    assert any(level == "err" and "'c1'" in msg for level, msg in ksr.logged)
    # dialog events, flush, start and the ticks never raise, never return 0 (that stops
    # the cfg)
    ksr.in_dialog("c1", "BYE")
    assert adapter.dialog_event("dialog:end") == adapter.OK
    assert adapter.flush() == 0
    assert adapter.start() == adapter.OK and adapter.timer() == adapter.OK
    assert adapter.start_native() == adapter.OK
    assert adapter.NativeHandler().tick(object()) == adapter.OK


def test_start_and_tick_hold_the_node_lease(ksr: FakeKSR, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """A proxy node's timer: its tick renews its lease, so its calls keep counting
    while those of a node that stopped renewing end (``node_lost``); its flush applies
    the queued BYE."""
    policy = parse_policy(POLICY + "nodes: {lease: 2s, renew: 100ms}\n")
    store = MemoryStore(policy.namespace)
    node = Engine(policy, store, node="test-node", lease=True)
    adapter.set_engine_factory(lambda: node)
    lost = Engine(policy, store, node="lost-node", lease=True)  # a proxy that died
    lost.start()
    gone = Call.from_raw("gone", "t", from_user="bob", ruri_user="5550",
                         headers={"X-Account": "other"})
    assert lost.admit(gone).admitted

    assert adapter.start() == adapter.OK
    first_lease = store.nodes()["test-node"]
    ksr.invite("c1")
    assert adapter.admit_current().admitted
    ksr.invite("c2", account="beta")
    assert adapter.admit_current().admitted
    ksr.in_dialog("c2", "BYE")
    assert adapter.dialog_event("dialog:end") == adapter.OK
    assert store.profile_size("total") == 3 and len(ksr.queue) == 1

    # 2.5 s later, this node's timer ticking every 100 ms (its renew interval): the
    # other's lease (2 s) has lapsed, this node's was renewed

    def timer_renewed() -> bool:
        monkeypatch.setattr(adapter, "_next_tick", 0.0)  # the once-a-second tick now
        node.lifecycle.renew_soon()
        assert adapter.timer() == adapter.OK
        return store.nodes()["test-node"] > first_lease + 2_000

    for _ in range(25):
        store.clock_offset_ms += 100
        timer_renewed()
    assert wait_for(timer_renewed, 5), "the tick did not renew the node's lease"
    assert not ksr.queue  # the BYE was applied
    assert store.profile_size("total") == 1  # c1 still counts; c2 ended; "gone" swept
    assert store.profile_size("account", "acme") == 1
    assert store.profile_size("account", "other") == 0
    reasons = {r.call_id: r.reason for r in store.call_records()}
    assert reasons == {"c2": "bye", "gone": "node_lost"}


# native flavour: the timer process --------------------------------------------------


def test_fallback_tables_follow_the_classification(ksr: FakeKSR, engine: Engine) -> None:
    tables = adapter.fallback_tables(engine.policy)
    assert tables["policer"] == {"ready": 1, "admit_on_error": 0, "reject_code": 503,
                                 "reject_reason": "Call Limit Reached", "reject_retry": 7}
    # exact numbers, prefixes (longest wins: 991 is local under the emergency 99), default
    assert tables["policer_class"] == {"enabled": 1, "n:112": 1, "p:99": 1, "p:991": 2,
                                       "default": 2, "maxlen": 3}
    no_emergency = parse_policy(POLICY.replace("emergency: {class: emergency, bypass: true}",
                                               "emergency: {class: local}"))
    assert adapter.fallback_tables(no_emergency)["policer_class"]["n:112"] == 2


def cfg_says_emergency(tables: dict[str, dict[str, int | str]], number: str) -> bool:
    """route POLICER_EMERGENCY of deploy/kamailio/policer.cfg over the htables, in
    Python: exact number, else the longest prefix (from maxlen down), else default."""
    t = tables["policer_class"]
    if t.get("enabled") != 1:
        return False
    found = t.get(f"n:{number}", 0)
    if found == 0:
        length = min(len(number), int(t["maxlen"]))
        while length > 0 and found == 0:
            found = t.get(f"p:{number[:length]}", 0)
            length -= 1
    if found == 0:
        found = t.get("default", 0)
    return found == 1


_DIGITS = "012"
_entries = st.sets(st.text(alphabet=_DIGITS, min_size=1, max_size=4), max_size=6)


@st.composite
def classifications(draw: st.DrawFn) -> Policy:
    """Up to four classes over three digits (so that prefixes nest and overlap), each
    number and each prefix in one class, an optional default, an optional emergency
    class."""
    count = draw(st.integers(1, 4))
    numbers, prefixes = draw(_entries), draw(_entries)
    # a number and a prefix of the same digits may be of different classes
    number_of = {e: draw(st.integers(0, count - 1)) for e in sorted(numbers)}
    prefix_of = {e: draw(st.integers(0, count - 1)) for e in sorted(prefixes)}
    default = draw(st.none() | st.integers(0, count - 1))
    classes = tuple(NumberClass(
        f"c{i}", numbers=frozenset(n for n in numbers if number_of[n] == i),
        prefixes=tuple(sorted(p for p in prefixes if prefix_of[p] == i)), default=default == i)
        for i in range(count))
    emergency = draw(st.none() | st.integers(0, count - 1))
    return Policy(namespace="prop", classes=classes,
                  emergency_class=None if emergency is None else f"c{emergency}")


_NUMBERS = [""] + ["".join(t) for n in range(1, 6) for t in itertools.product(_DIGITS, repeat=n)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(classifications())
def test_fallback_tables_tell_emergency_numbers_as_the_classifier_does(policy: Policy) -> None:
    """The reduced htables answer 'emergency?' as the Python classifier does for every
    number of up to five digits (every entry, the numbers under and between them)."""
    tables = adapter.fallback_tables(policy)
    classifier = Classifier(policy)
    for number in _NUMBERS:
        expected = (policy.emergency_class is not None
                    and classifier.number_class(number) == policy.emergency_class)
        assert cfg_says_emergency(tables, number) == expected, (number, tables)


def test_fallback_tables_leave_out_a_long_list_that_changes_no_answer() -> None:
    premium = tuple(f"0900{i:06d}" for i in range(100_000))
    policy = Policy(namespace="big", classes=(
        NumberClass("emergency", numbers=frozenset({"112", "110"}), prefixes=("11",)),
        NumberClass("premium", prefixes=premium),
        NumberClass("ported", numbers=frozenset({"1100", "0900000001"})),
        NumberClass("other", default=True)), emergency_class="emergency")
    # the premium prefixes answer 'not emergency' as the default does; 112 and 110
    # answer as their prefix 11 does; 1100 is an exception under 11
    assert adapter.fallback_tables(policy)["policer_class"] == {
        "enabled": 1, "p:11": 1, "n:1100": 2, "default": 2, "maxlen": 2}


def test_native_timer_writes_only_what_changed(ksr: FakeKSR, engine: Engine,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    timer = adapter.NativeTimer(engine, None)
    timer.start()
    written: list[tuple[str, str]] = []

    def seti(table: str, key: str, value: int) -> int:
        written.append((table, key))
        return ksr._sht_set(table, key, value)

    monkeypatch.setattr(ksr.htable, "sht_seti", seti)
    timer.fill_tables(parse_policy(POLICY.replace('numbers: ["112"]', 'numbers: ["911"]')))
    assert written == [("policer_class", "n:911")]
    assert "n:112" not in ksr.tables["policer_class"]


def test_native_timer_fills_tables_and_refuses_an_attribute_change(
        ksr: FakeKSR, engine: Engine, tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    timer = adapter.NativeTimer(engine, str(path))
    timer.start()
    assert ksr.tables["policer_class"]["n:112"] == 1
    assert "test-node" in engine.store.nodes()
    # a reload that keeps the attributes: swapped in, tables follow (stale keys removed)
    timer._reload(parse_policy(POLICY.replace('numbers: ["112"]', 'numbers: ["911"]')))
    assert "n:112" not in ksr.tables["policer_class"]
    assert ksr.tables["policer_class"]["n:911"] == 1
    # one that reads another attribute needs a restart (the cfg packs the old ones)
    changed = POLICY.replace("  account: {value: account}", "  account: {value: account}\n"
                             "  callee: {value: to_user}")
    with pytest.raises(ValueError, match="restart"):
        timer._reload(parse_policy(changed))


def test_native_timer_reloads_a_changed_list_in_the_background(ksr: FakeKSR,
                                                               tmp_path: Any) -> None:
    """The timer's tick notices a changed prefixes_file, reads it off the tick and
    swaps policy and htables in together."""
    (tmp_path / "sos.txt").write_text("99\n")
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace('prefixes: ["99"]', "prefixes_file: sos.txt"))
    policy = parse_policy(path.read_text(), str(path))
    eng = Engine(policy, MemoryStore(policy.namespace), node="test-node")
    timer = adapter.NativeTimer(eng, str(path))
    assert eng.watcher is timer.watcher  # the engine's tick polls it
    timer.start()
    assert ksr.tables["policer_class"]["p:99"] == 1
    timer.watcher.interval = 0  # type: ignore[union-attr]
    (tmp_path / "sos.txt").write_text("98\n")

    def reloaded() -> bool:
        timer.tick()
        return "p:98" in ksr.tables["policer_class"]

    assert wait_for(reloaded, 10)
    assert "p:99" not in ksr.tables["policer_class"]
    assert eng.policy.classes[0].prefixes == ("98",)


def test_native_timer_publishes_the_cfg_counters(ksr: FakeKSR, engine: Engine) -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    engine.metrics = metrics
    timer = adapter.NativeTimer(engine, None)
    ksr.values.update({f"$stat({bucket_counter('admitted', 2)})": 3,
                       f"$stat({sum_counter('admitted')})": 600,
                       f"$stat({bucket_counter('rejected', 13)})": 1,
                       f"$stat({sum_counter('rejected')})": 2_000_000,
                       "$stat(policer_store_error_admit)": 2,
                       "$stat(policer_fallback_admitted)": 2})
    ksr.tables["policer"] = {"held": 4, "dropped": 1}
    ksr.queue.extend(["x", "y"])
    timer.tick()
    timer.tick()  # counters unchanged: nothing counted twice

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("policer_decision_seconds_count", result="admitted") == 3
    bucket = "policer_decision_seconds_bucket"
    assert value(bucket, result="admitted", le="0.0001") == 0
    assert value(bucket, result="admitted", le="0.00025") == 3
    assert value("policer_decision_seconds_sum", result="admitted") == \
        pytest.approx(0.0006)
    assert value("policer_decision_seconds_count", result="rejected") == 1
    assert value("policer_store_errors_total", op="admit") == 2
    assert value("policer_fallback_decisions_total", admitted="true") == 2
    assert value("policer_pending_operations") == 6
    assert value("policer_pending_dropped_total") == 1
    assert value("policer_probe_seconds_count") == 2


# hostile SIP values through the adapter (issue 5) -----------------------------------

_NASTY = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63),
    st.text(alphabet=st.sampled_from("{}:; \r\n\x00\t%~*@<>\"'\\aé€\ud800"), max_size=40),
    st.binary(max_size=40),
    st.just("x" * 65536),
    st.just("{" * 4096 + ":" + "}" * 4096),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.fixed_dictionaries({k: _NASTY for k in ("$ci", "$ft", "$fU", "$fd", "$rU",
                                                           "$tU", "$si", "$au")}),
       account=_NASTY)
def test_hostile_sip_values_never_raise_and_get_a_sip_answer(
        ksr: FakeKSR, engine: Engine, values: dict[str, Any], account: Any) -> None:
    ksr.values.clear()
    ksr.values.update(values)
    ksr.headers = {"x-account": account} if account is not None else {}
    ksr.replies.clear()
    verdict = adapter.admit_current()
    assert verdict.code == 200 or 300 <= verdict.code <= 699
    assert "\r" not in verdict.reason and "\n" not in verdict.reason
    if not verdict.admitted:
        adapter.reject_current(verdict)
        assert len(ksr.replies) == 1
    # whatever was admitted can be ended again through the (queued) dialog events
    ksr.values.update({"$dlg(callid)": values["$ci"], "$dlg(from_tag)": values["$ft"],
                       "$rm": "BYE"})
    adapter.dialog_event("dialog:end")
    adapter.flush()
    assert engine.store.stats()["active"] == 0
