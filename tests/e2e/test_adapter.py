"""The Kamailio adapter without Kamailio: a fake ``KSR`` module and a fake engine.

Fast (no processes): it covers what the e2e tests cannot provoke on purpose,
the adapter's own error paths. Not marked e2e.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from policer.adapters import kamailio as adapter
from policer.call import Call, dialog_id


class FakePV:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.set: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def sets(self, name: str, value: str) -> None:
        self.set[name] = value

    def seti(self, name: str, value: int) -> None:
        self.set[name] = value


class FakeHdr:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.appended: list[str] = []

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def append_to_reply(self, text: str) -> None:
        self.appended.append(text)


class FakeSL:
    def __init__(self) -> None:
        self.replies: list[tuple[int, str]] = []

    def send_reply(self, code: int, reason: str) -> None:
        self.replies.append((code, reason))


@pytest.fixture
def ksr() -> Iterator[types.SimpleNamespace]:
    values = {
        "$ci": "abc@host",
        "$ft": "tag1",
        "$fU": "alice",
        "$fd": "example.net",
        "$rU": "0044123",
        "$tU": "0044123",
        "$si": "127.0.0.1",
        "$au": None,
        "$rm": "INVITE",
    }
    fake = types.SimpleNamespace(
        pv=FakePV(values),
        hdr=FakeHdr({"X-Account": "acme"}),
        sl=FakeSL(),
        logged=[],
    )
    for level in ("err", "warn", "notice", "info", "dbg"):
        setattr(fake, level, lambda msg, _l=level: fake.logged.append((_l, msg)))
    module = types.ModuleType("KSR")
    module.__dict__.update(fake.__dict__)
    sys.modules["KSR"] = module
    adapter._ksr_module = None
    try:
        yield fake
    finally:
        sys.modules.pop("KSR", None)
        adapter._ksr_module = None
        adapter.set_engine_factory(adapter._default_factory)


@dataclass(frozen=True)
class FakeDecision:
    admitted: bool
    code: int = 200
    reason: str = "OK"
    retry_after: int | None = None


@dataclass
class FakePolicy:
    header_names: tuple[str, ...] = ("x-account",)


@dataclass
class FakeEngine:
    decision: FakeDecision = field(default_factory=lambda: FakeDecision(True))
    fail: bool = False
    policy: FakePolicy = field(default_factory=FakePolicy)
    calls: list[Call] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def admit(self, call: Call) -> FakeDecision:
        if self.fail:
            raise RuntimeError("boom")
        self.calls.append(call)
        return self.decision

    def confirm(self, dialog_id: str) -> bool:
        if self.fail:
            raise RuntimeError("boom")
        self.events.append(("confirm", dialog_id, ""))
        return True

    def release(self, dialog_id: str, reason: str = "bye") -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.events.append(("release", dialog_id, reason))


def use(engine: FakeEngine) -> FakeEngine:
    adapter.set_engine_factory(lambda: engine)
    return engine


def test_call_is_built_from_pseudo_variables(ksr: types.SimpleNamespace) -> None:
    engine = use(FakeEngine())
    verdict = adapter.admit_current()
    assert verdict.admitted and verdict.code == 200
    (call,) = engine.calls
    assert (call.call_id, call.from_tag, call.from_user, call.from_domain) == (
        "abc@host",
        "tag1",
        "alice",
        "example.net",
    )
    assert (call.ruri_user, call.source_ip, call.auth_user) == ("0044123", "127.0.0.1", "")
    assert dict(call.headers) == {"x-account": "acme"}
    assert verdict.dialog_id == dialog_id("abc@host", "tag1")


def test_native_rejection_sets_vars(ksr: types.SimpleNamespace) -> None:
    use(FakeEngine(FakeDecision(False, 486, "Account\r\nLimit", 30)))
    assert adapter.NativeHandler().admit(object()) == adapter.FALSE
    assert ksr.pv.set == {
        "$var(policer_code)": 486,
        "$var(policer_reason)": "AccountLimit",
        "$var(policer_retry_after)": 30,
    }


def test_kemi_rejection_replies_with_retry_after(ksr: types.SimpleNamespace) -> None:
    use(FakeEngine(FakeDecision(False, 503, "Call Limit Reached", 7)))
    adapter.reject_current(adapter.admit_current())
    assert ksr.hdr.appended == ["Retry-After: 7\r\n"]
    assert ksr.sl.replies == [(503, "Call Limit Reached")]


def test_engine_failure_answers_500_and_logs_call_id(ksr: types.SimpleNamespace) -> None:
    use(FakeEngine(fail=True))
    handler = adapter.NativeHandler()
    assert handler.admit(object()) == adapter.FALSE
    assert ksr.pv.set["$var(policer_code)"] == 500
    assert any(level == "err" and "abc@host" in msg for level, msg in ksr.logged)
    # dialog events never raise either, and never return 0 (which stops the cfg)
    assert handler.dialog_event(object(), "dialog:end") == adapter.OK


def test_engine_construction_failure_is_caught(ksr: types.SimpleNamespace) -> None:
    def broken() -> adapter.EngineLike:
        raise OSError("no policy")

    adapter.set_engine_factory(broken)
    assert adapter.admit_current().code == 500


@pytest.mark.parametrize(
    ("event", "method", "status", "expected"),
    [
        ("dialog:start", "INVITE", "200", ("confirm", "")),
        ("dialog:end", "BYE", None, ("release", "bye")),
        ("dialog:end", "OPTIONS", None, ("release", "timeout")),  # faked message
        ("dialog:failed", "INVITE", "486", ("release", "failed")),
        ("dialog:failed", "INVITE", "487", ("release", "cancel")),
        ("dialog:failed", "CANCEL", None, ("release", "cancel")),
    ],
)
def test_dialog_events(
    ksr: types.SimpleNamespace,
    event: str,
    method: str,
    status: str | None,
    expected: tuple[str, str],
) -> None:
    engine = use(FakeEngine())
    # a BYE from the callee: $ft is the callee's tag, $dlg(from_tag) the caller's
    ksr.pv.values.update(
        {
            "$rm": method,
            "$rs": status,
            "$ft": "callee-tag",
            "$dlg(callid)": "abc@host",
            "$dlg(from_tag)": "tag1",
        }
    )
    assert adapter.dialog_event(event) == adapter.OK
    assert engine.events == [(expected[0], dialog_id("abc@host", "tag1"), expected[1])]


def test_engine_is_built_once_per_process(
    ksr: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[FakeEngine] = []

    def factory() -> FakeEngine:
        built.append(FakeEngine())
        return built[-1]

    adapter.set_engine_factory(factory)
    assert adapter.engine() is adapter.engine()
    monkeypatch.setattr("os.getpid", lambda: -1)  # "after fork"
    adapter.engine()
    assert len(built) == 2
