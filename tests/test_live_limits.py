"""policer.live_limits over the in-process store: what a change reports (the JSON
``policer limits`` prints), and what cannot be a live limit. The command line's
output and the audit events are tested through the command line (test_cli*.py)."""

from __future__ import annotations

import pytest

from policer import live_limits
from policer.live_limits import LiveLimitError
from policer.policy import Rate
from policer.store import MemoryStore
from tests.support.policies import build_policy

POLICY = build_policy(
    "ll", version=2, profiles={"total": {}, "user": "from_user"},
    limits={"total": 10, "user": {"max": 2, "rate": {"max": 5, "per": "1m"},
                                  "calls": [{"max": 100, "per": "1d"}]}})


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore(POLICY.namespace, policy=POLICY)
    s.load(POLICY)
    return s


def test_a_live_max_is_set_read_and_unset(store: MemoryStore) -> None:
    assert live_limits.read(POLICY, store, "user", "alice").as_dict() == {
        "profile": "user", "value": "alice", "live": None, "default": 2, "effective": 2}
    change = live_limits.set_max(POLICY, store, "user", "alice", 5)
    assert change.as_dict() == {"profile": "user", "value": "alice", "old": None, "new": 5,
                                "default": 2}
    assert live_limits.read(POLICY, store, "user", "alice").effective == 5
    assert live_limits.table(store, "user") == {"alice": 5}
    assert live_limits.set_max(POLICY, store, "user", "alice", None).as_dict()["old"] == 5
    assert live_limits.table(store, "user") == {}


def test_a_live_rate_and_window_cap_report_their_kind(store: MemoryStore) -> None:
    change = live_limits.set_rate(POLICY, store, "user", "bob", Rate(1, 1000, 1))
    assert change.as_dict() == {"profile": "user", "value": "bob", "kind": "rate",
                                "old": None, "new": "1/1s burst 1", "default": "5/1m"}
    assert live_limits.set_rate(POLICY, store, "user", "bob", None).old == "1/1s burst 1"
    change = live_limits.set_calls(POLICY, store, "user", "bob", "1d", 7)
    assert (change.kind, change.old, change.new, change.default) == (
        "calls", None, "7/1d", "100/1d")


def test_what_cannot_be_a_live_limit_says_why(store: MemoryStore) -> None:
    with pytest.raises(LiveLimitError, match="has no value: live limits are per value"):
        live_limits.valued_profile(POLICY, "total")
    live_limits.valued_profile(POLICY, "user")
    with pytest.raises(LiveLimitError, match="no '1h' window in the policy \\(its windows: 1d\\)"):
        live_limits.set_calls(POLICY, store, "user", "bob", "1h", 3)
    with pytest.raises(LiveLimitError, match="more than one call per microsecond"):
        live_limits.set_rate(POLICY, store, "user", "bob", Rate(10_000, 1, 1))
    assert live_limits.table(store, "user") == {}
