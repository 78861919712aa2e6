"""The fraud guard's alerts end to end (issue 19): calls admitted through policer sweep
international numbers until a fraud rule crosses its warning, then its critical level;
``policer exporter`` serves the events and the block, a real Prometheus scrapes it and
evaluates the repository's alert rules (deploy/prometheus/alerts.yml, unchanged), a real
Alertmanager routes them as deploy/prometheus/alertmanager.yml says, and its webhook
brings the on-call's notifications to this test: PolicerFraudWarning, then
PolicerFraudCritical and PolicerFraudBlocked for that rule, the warning then inhibited by
the critical; nothing for the rule that saw no fraud, nor for the user under the levels.

Only the timings differ from production (1 s scrapes, evaluations and grouping), and
the ports (free loopback ones). See :mod:`lab.alerting`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.alerting import AlertStack, PolicerExporter, find_alertmanager, find_prometheus
from lab.redis_server import RedisServer
from policer.call import Call
from policer.engine import Decision, Engine
from policer.policy import load_policy
from policer.store import RedisStore
from tests.support import STORE_TIMEOUT_MS, call, new_namespace, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

RULE = "intl-sweep"
QUIET_RULE = "call-flood"
FRAUDSTER, OTHER = "mallory", "alice"
ALERT_TIMEOUT_S = 60

# The window is a day (the sweep must not straddle a window's start, where its counts
# begin afresh; the sweep below goes on until the levels are reached anyway); the block
# outlasts the test, so that PolicerFraudBlocked is still up when Prometheus evaluates.
POLICY = """\
version: 2
namespace: NAMESPACE
classes:
  emergency: {numbers: ["112"]}
  international: {prefixes: ["00"]}
  local: {default: true}
profiles:
  total: {}
  user: {value: from_user}
limits:
  total: {max: 100}
  user: {max: 20}
emergency: {class: emergency, bypass: true}
fraud:
  - name: intl-sweep
    key: user
    when: {class: international}
    per: 1d
    distinct_numbers: {warning: 3, critical: 5}
    action: {block: 10m, reject: {code: 403, reason: "Fraud Suspected"}}
  # a rule no call comes near: it must raise nothing
  - name: call-flood
    key: user
    per: 1d
    calls: {warning: 50, critical: 100}
    action: {block: 10m}
"""


def intl(user: str, i: int) -> Call:
    return call(f"0044207{i:04d}", user)


@pytest.fixture(scope="module")
def tools() -> None:
    """Debian's prometheus and prometheus-alertmanager (bin/setup installs them): missing,
    the test fails rather than skip, as tests/test_alert_rules.py does."""
    missing = [name for name, path in (("prometheus", find_prometheus()),
                                       ("prometheus-alertmanager", find_alertmanager()))
               if path is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `bash bin/setup` (Debian "
                    "packages prometheus, prometheus-alertmanager)", pytrace=False)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "fraud-policy.yaml"
    path.write_text(POLICY.replace("NAMESPACE", new_namespace()))
    return path


@pytest.fixture
def engine(redis_server: RedisServer, policy_path: Path) -> Iterator[Engine]:
    """A proxy's engine over the private Redis, the policy's library loaded."""
    policy = load_policy(policy_path)
    store = RedisStore(redis_server.url, policy.namespace, timeout_ms=STORE_TIMEOUT_MS)
    try:
        e = Engine(policy, store, node="alerting-test")
        store.load(policy)
        yield e
    finally:
        store.close()


@pytest.fixture
def exporter(tools: None, engine: Engine, redis_server: RedisServer, policy_path: Path,
             tmp_path: Path) -> Iterator[PolicerExporter]:
    exp = PolicerExporter(redis_server.url, policy_path, tmp_path)
    try:
        yield exp.start()
    finally:
        exp.close()


@pytest.fixture
def stack(exporter: PolicerExporter, tmp_path: Path) -> Iterator[AlertStack]:
    s = AlertStack(tmp_path, exporter.port)
    try:
        yield s.start()
    finally:
        s.close()


def sweep_until(engine: Engine, user: str, first: int, done: Callable[[], bool],
                limit: int = 12
                ) -> list[Decision]:
    """Calls from ``user`` to new international numbers (from ``first``) until ``done()``
    holds after one (at most ``limit`` calls)."""
    got: list[Decision] = []
    for i in range(first, first + limit):
        got.append(engine.admit(intl(user, i)))
        if done():
            return got
    raise AssertionError(f"{limit} calls from {user}: {got}")


def test_a_number_sweep_notifies_warning_then_critical_and_the_block(
        engine: Engine, stack: AlertStack) -> None:
    store = engine.store
    assert isinstance(store, RedisStore)
    # Prometheus holds every fraud series at 0 before anything moves: increase() needs
    # a sample before the event to see one
    series = 'policer_fraud_events_total{rule=~"intl-sweep|call-flood"}'
    zeros = stack.wait_query(series, lambda r: len(r) == 4, timeout=30)
    assert {(m["rule"], m["level"], m["stat"]): v for m, v in zeros} == {
        (RULE, "warning", "distinct_numbers"): 0, (RULE, "critical", "distinct_numbers"): 0,
        (QUIET_RULE, "warning", "calls"): 0, (QUIET_RULE, "critical", "calls"): 0}
    up: list[Decision] = []

    # another user dials two international numbers: under the warning level
    up += [engine.admit(intl(OTHER, i)) for i in range(2)]
    assert all(d.admitted for d in up)

    # the fraudster's sweep reaches the warning level: reported, the calls go on
    def level(name: str) -> int:
        return store.fraud_counts().get((RULE, name, "distinct_numbers"), 0)

    warned = sweep_until(engine, FRAUDSTER, 0, lambda: level("warning") >= 1)
    assert all(d.admitted for d in warned)
    up += warned
    warning = stack.wait_for("PolicerFraudWarning", rule=RULE, level="warning",
                             stat="distinct_numbers", timeout=ALERT_TIMEOUT_S)
    assert warning.labels["severity"] == "warning"
    assert warning.annotations["summary"] == \
        f"Fraud rule {RULE} crossed its warning level (distinct_numbers)"

    # ... then the critical level: the crossing call is refused, the fraudster blocked
    more = sweep_until(engine, FRAUDSTER, len(warned), lambda: level("critical") >= 1)
    crossing = more[-1]
    assert (crossing.admitted, crossing.code, crossing.reason, crossing.kind,
            crossing.limit) == (False, 403, "Fraud Suspected", "fraud", RULE)
    assert all(d.admitted for d in more[:-1])
    up += more[:-1]
    assert [(b.rule, b.value) for b in store.fraud_blocks()] == [(RULE, FRAUDSTER)]

    critical = stack.wait_for("PolicerFraudCritical", rule=RULE, level="critical",
                              stat="distinct_numbers", timeout=ALERT_TIMEOUT_S)
    assert critical.labels["severity"] == "critical"
    assert critical.annotations["summary"] == \
        f"Fraud rule {RULE} crossed its critical level (distinct_numbers)"
    blocked = stack.wait_for("PolicerFraudBlocked", rule=RULE, timeout=ALERT_TIMEOUT_S)
    assert blocked.labels["severity"] == "critical"
    # one value blocked: the fraudster, not the other user
    assert blocked.annotations["summary"] == f"1 value(s) blocked by fraud rule {RULE}"

    # alertmanager.yml's inhibit rule: the critical mutes the warning of the same rule
    am = stack.alertmanager
    assert am is not None

    def warning_inhibited() -> bool:
        return any(a["labels"].get("alertname") == "PolicerFraudWarning"
                   and a["labels"].get("rule") == RULE
                   and a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"]
                   for a in am.alerts())

    assert wait_for(warning_inhibited, timeout=ALERT_TIMEOUT_S, interval=0.2), \
        stack.diagnostics()

    # the other user is not blocked: a number it dialled before is admitted
    again = engine.admit(intl(OTHER, 0))
    assert again.admitted, again
    up.append(again)
    assert engine.admit(call("5551234", FRAUDSTER)).code == 403  # blocked, whatever it dials

    # nothing for the rule that saw no fraud, nor any other alert: what Prometheus fires
    # now (after the evaluations that fired the ones above) is the swept rule's three
    firing = {(a["labels"]["alertname"], a["labels"].get("rule")) for a in stack.firing()}
    assert firing == {("PolicerFraudWarning", RULE), ("PolicerFraudCritical", RULE),
                      ("PolicerFraudBlocked", RULE)}
    received = {(a.name, a.labels.get("rule"), a.status) for a in stack.alerts()}
    assert received == {("PolicerFraudWarning", RULE, "firing"),
                        ("PolicerFraudCritical", RULE, "firing"),
                        ("PolicerFraudBlocked", RULE, "firing")}
    # the exporter's counts as Prometheus stored them: one event per level, one block
    now = {(m["rule"], m["level"]): v for m, v in stack.query(series)}
    assert now == {(RULE, "warning"): 1, (RULE, "critical"): 1,
                   (QUIET_RULE, "warning"): 0, (QUIET_RULE, "critical"): 0}
    assert {m["rule"]: v for m, v in stack.query("policer_fraud_blocked")} == {
        RULE: 1, QUIET_RULE: 0}
    assert {(e.value, e.level) for e in store.fraud_events()} == {
        (FRAUDSTER, "warning"), (FRAUDSTER, "critical")}

    for d in up:
        engine.release(d.dialog_id)
    assert store.profile_size("total") == 0
