"""The Kamailio adapter without Kamailio: a real engine over the in-process store,
and a fake ``KSR`` module (KSR only exists inside Kamailio).

Fast (no processes): what a caller sees when the adapter decides (the reply
code, reason and Retry-After sent, or the relay) and how calls end, including
the failures the end-to-end tests cannot provoke on purpose. Not marked e2e.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policer.adapters import kamailio as adapter
from policer.call import Call
from policer.engine import Engine
from policer.policy import parse_policy
from policer.store import MemoryStore

POLICY = """
version: 1
namespace: adapter
call:
  attributes: {account: "header:X-Account"}
profiles:
  total: {}
  account: {value: account}
limits:
  total: {max: 10}
  account: {max: 1, reject: {code: 486, reason: "Account Call Limit", retry_after: 30}}
reject: {code: 503, reason: "Call Limit Reached", retry_after: 7}
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
        self._appended: list[str] = []
        self.pv = types.SimpleNamespace(get=self.values.get, sets=self.vars.__setitem__,
                                        seti=self.vars.__setitem__)
        self.hdr = types.SimpleNamespace(get=lambda n: self.headers.get(n.lower()),
                                         append_to_reply=self._appended.append)
        self.sl = types.SimpleNamespace(send_reply=self._reply)
        for level in ("err", "warn", "notice", "info", "dbg"):
            setattr(self, level, lambda msg, _l=level: self.logged.append((_l, msg)))

    def _reply(self, code: int, reason: str) -> None:
        self.replies.append((code, reason, list(self._appended)))
        self._appended.clear()

    def invite(self, call_id: str, user: str = "alice", account: str = "acme") -> None:
        self.values.clear()
        self.values.update({"$ci": call_id, "$ft": f"tag-{call_id}", "$fU": user,
                            "$fd": "example.net", "$rU": "5551234", "$tU": "5551234",
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
    adapter._ksr_module = None
    try:
        yield fake
    finally:
        sys.modules.pop("KSR", None)
        adapter._ksr_module = None
        adapter.set_engine_factory(None)


@pytest.fixture
def engine(ksr: FakeKSR) -> Engine:
    policy = parse_policy(POLICY)
    real = Engine(policy, MemoryStore(policy.namespace), node="test-node")
    adapter.set_engine_factory(lambda: real)
    return real


def test_admitted_invite_is_relayed_and_counted(ksr: FakeKSR, engine: Engine) -> None:
    ksr.invite("c1")
    assert adapter.NativeHandler().admit(object()) == adapter.OK
    kept = ksr.vars.pop("$var(policer_call)")
    assert ksr.vars == {"$var(policer_code)": 200, "$var(policer_reason)": "OK",
                        "$var(policer_retry_after)": -1}
    # the call's attributes, kept with Kamailio's dialog for `policer reconcile`
    assert Call.from_json("c1", "x", kept).headers == {"x-account": "acme"}
    assert ksr.replies == []
    assert engine.store.profile_size("account", "acme") == 1
    assert engine.store.profile_size("total") == 1


def test_rejection_reply_native_and_kemi(ksr: FakeKSR, engine: Engine) -> None:
    ksr.invite("c1")
    assert adapter.admit_current().admitted
    # native: the cfg replies from $var(...)
    ksr.invite("c2")
    assert adapter.NativeHandler().admit(object()) == adapter.FALSE
    assert ksr.vars == {"$var(policer_code)": 486, "$var(policer_reason)": "Account Call Limit",
                        "$var(policer_retry_after)": 30, "$var(policer_call)": ""}
    # KEMI: the adapter replies itself, with Retry-After
    ksr.invite("c3", account="")
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
def test_dialog_events_release_with_reason(
    ksr: FakeKSR, engine: Engine, event: str, method: str, status: str | None, reason: str
) -> None:
    ksr.invite("c1")
    assert adapter.admit_current().admitted
    if event == "dialog:end":
        ksr.in_dialog("c1", "INVITE", "200")
        assert adapter.dialog_event("dialog:start") == adapter.OK
        assert engine.store.stats()["confirmed"] == 1
    ksr.in_dialog("c1", method, status)  # e.g. a BYE from the callee: tags reversed
    assert adapter.dialog_event(event) == adapter.OK
    assert engine.store.profile_size("total") == 0
    (record,) = engine.store.call_records()
    assert (record.call_id, record.reason) == ("c1", reason)


def test_failures_answer_500_and_never_raise(ksr: FakeKSR, engine: Engine) -> None:
    def broken() -> Engine:
        raise OSError("no policy file")

    adapter.set_engine_factory(broken)
    ksr.invite("c1")
    handler = adapter.NativeHandler()
    assert handler.admit(object()) == adapter.FALSE
    assert ksr.vars["$var(policer_code)"] == 500
    assert any(level == "err" and "'c1'" in msg for level, msg in ksr.logged)
    # dialog events, start and tick never raise, and never return 0 (that stops the cfg)
    ksr.in_dialog("c1", "BYE")
    assert handler.dialog_event(object(), "dialog:end") == adapter.OK
    assert adapter.start() == adapter.OK and handler.tick(object()) == adapter.OK


def test_start_and_tick_hold_the_node_lease(ksr: FakeKSR, engine: Engine) -> None:
    assert adapter.start() == adapter.OK
    assert "test-node" in engine.store.nodes()
    assert adapter.NativeHandler().tick(object()) == adapter.OK


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
    ksr.vars.clear()
    result = adapter.NativeHandler().admit(object())
    assert result in (adapter.OK, adapter.FALSE)
    code = ksr.vars["$var(policer_code)"]
    assert code == 200 or 300 <= code <= 699
    reason = ksr.vars["$var(policer_reason)"]
    assert isinstance(reason, str) and "\r" not in reason and "\n" not in reason
    # whatever was admitted can be ended again through the dialog events
    ksr.values.update({"$dlg(callid)": values["$ci"], "$dlg(from_tag)": values["$ft"],
                       "$rm": "BYE"})
    adapter.dialog_event("dialog:end")
    assert engine.store.stats()["active"] == 0
