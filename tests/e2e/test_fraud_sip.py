"""The fraud guard (issue 19, item 6) through Kamailio, both flavours: one user sweeps
sequential international numbers (SIPp, one call after the other); the third distinct
number reports a warning, the fifth crosses critical and gets the rule's 403 "Fraud
Suspected", and the user is blocked: their next call, even to a local number, gets it
too, while another user's call goes through. The block ends when it should (4 s after
the crossing, by Redis's clock, checked at each admit: no sweep): the user's local call
is answered again, and a sixth distinct international number, the sweep still at
critical, crosses again (a new critical event, a new block). Every count returns to 0.
The critical event reaches an on-call webhook: ``policer exporter`` scraped by a real
Prometheus evaluating deploy/prometheus/alerts.yml, whose PolicerFraudCritical goes
through a real
Alertmanager (deploy/prometheus/alertmanager.yml's routing) to a loopback webhook
(lab/alerting.py).

Policy: tests/e2e/policies/fraud.yaml (rule intl-sweep: distinct international
numbers per user and hour, warning 3, critical 5, block 4 s).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import pytest
import redis

from lab.alerting import AlertStack, PolicerExporter, find_alertmanager, find_prometheus
from tests.support import wait_for
from tests.support.e2e import Lab, Proxy, UacResult, Uas

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

RULE = "intl-sweep"
BLOCK_MS = 4000
HOUR_MS = 3_600_000
MALLORY, ALICE = "mallory", "alice"
#: sequential international numbers (class international: prefix 00)
SWEEP = [f"00442075550{i:03d}" for i in range(6)]
LOCAL = "5551234"
FRAUD = "403 Fraud Suspected"


def redis_ms(lab: Lab) -> int:
    """The store's clock (Redis TIME), the one windows and blocks are decided by."""
    client = redis.Redis.from_url(lab.redis_url)
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    return int(seconds) * 1000 + int(micros) // 1000


def clear_of_the_top_of_the_hour(lab: Lab, margin_ms: int = 45_000) -> None:
    """The rule counts per calendar hour (UTC, Redis's clock): a sweep across the top
    of an hour would count in two windows. When one is near, wait until it passed."""
    end = (redis_ms(lab) // HOUR_MS + 1) * HOUR_MS
    if end - redis_ms(lab) < margin_ms:
        assert wait_for(lambda: redis_ms(lab) > end, margin_ms / 1000 + 5, interval=0.2)


def outcomes(res: UacResult) -> list[tuple[str, str, str]]:
    """(user, number, what it got) of each call, in the order SIPp placed them."""
    got = {cid: "answered" for cid in res.answered}
    got.update({cid: f"{code} {reason}" for code, reason, _, cid in res.rejected})
    order = sorted(got, key=lambda cid: int(cid.split("-", 1)[0]))
    return [(res.call_of(cid)[0], res.call_of(cid)[2], got[cid]) for cid in order]


def alerts(lab: Lab) -> list[dict[str, Any]]:
    out = lab.policer("alerts", "tail", "-n", "0", "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def blocks(lab: Lab) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(lab.policer("blocks", "list", "--json"))["blocks"]
    return rows


def need_alerting_tools() -> None:
    missing = [name for name, found in (("prometheus", find_prometheus()),
                                        ("prometheus-alertmanager", find_alertmanager()))
               if found is None]
    if missing:
        why = f"the alert's path needs {', '.join(missing)} (Debian packages)"
        if os.environ.get("CI", "").lower() == "true":  # CI must run it, not skip it
            pytest.fail(why)
        pytest.skip(why)


def test_a_sweep_of_international_numbers_blocks_the_user_until_the_block_ends(
        lab: Lab) -> None:
    need_alerting_tools()
    lab.use_policy("fraud")
    assert lab.policy_path is not None
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)
    with contextlib.ExitStack() as running:
        exporter = running.enter_context(
            PolicerExporter(lab.redis_url, lab.policy_path, lab.workdir))
        alerting = running.enter_context(AlertStack(lab.workdir, exporter.port))
        # increase() sees an event only from a sample before it: the counter's 0 first
        alerting.wait_query(f'policer_fraud_events_total{{rule="{RULE}",level="critical"}}')
        sweep(lab, proxy, uas)
        # the crossing reached the on-call's webhook, through Prometheus and Alertmanager
        alert = alerting.wait_for("PolicerFraudCritical", rule=RULE, timeout=60)
        assert (alert.labels["stat"], alert.labels["severity"]) == (
            "distinct_numbers", "critical")
        assert alert.receiver == "policer-oncall"

    # every count back to 0
    assert lab.wait_size("total", 0) == 0
    for value in (MALLORY, ALICE):
        assert lab.size("user", value) == 0
    assert lab.size("international") == 0
    stats = lab.stats()
    assert stats["active"] == 0 and stats["early"] == 0
    assert stats["rejected"] == 3
    assert proxy.active_dialogs() == 0


def sweep(lab: Lab, proxy: Proxy, uas: Uas) -> None:
    """The sweep, the block and its end, as SIPp, `alerts tail` and `blocks list` see
    them."""
    clear_of_the_top_of_the_hour(lab)

    # one call at a time (-l 1): the order is the CSV's
    calls = [*((MALLORY, "", n) for n in SWEEP[:5]), (MALLORY, "", LOCAL),
             (ALICE, "", SWEEP[0])]
    res = lab.run_uac(proxy, calls, concurrent=1, rate=10)
    assert res.returncode == 0, res.output
    assert outcomes(res) == [
        (MALLORY, SWEEP[0], "answered"),
        (MALLORY, SWEEP[1], "answered"),
        (MALLORY, SWEEP[2], "answered"),  # the third distinct number: the warning
        (MALLORY, SWEEP[3], "answered"),
        (MALLORY, SWEEP[4], FRAUD),  # the fifth: critical, rejected, the user blocked
        (MALLORY, LOCAL, FRAUD),  # blocked, whatever the number
        (ALICE, SWEEP[0], "answered"),  # another user is not
    ]
    assert sorted(res.ended) == sorted(res.answered)
    # the rejected INVITEs never reached the upstream
    assert sum(line.startswith("INVITE ") for line in uas.lines()) == 5

    # blocked now, until the crossing plus the rule's block (the store's clock)
    blocked = blocks(lab)
    assert [(b["rule"], b["value"]) for b in blocked] == [(RULE, MALLORY)]
    until = int(blocked[0]["until"])

    events = alerts(lab)
    assert [(e["rule"], e["level"], e["stat"], e["key"], e["value"], e["count"],
             e["threshold"], e["action"], e["window"]) for e in events] == [
        (RULE, "warning", "distinct_numbers", "user", MALLORY, 3, 3, "report", "1h"),
        (RULE, "critical", "distinct_numbers", "user", MALLORY, 5, 5, "block", "1h"),
    ]
    critical = events[1]
    assert critical["block_ms"] == BLOCK_MS
    assert until - int(critical["at"]) == pytest.approx(BLOCK_MS, abs=50)
    assert events[0]["at"] <= critical["at"] < until

    # the block ends by Redis's clock: the admit checks it, no sweep has to run first
    assert wait_for(lambda: redis_ms(lab) > until, BLOCK_MS / 1000 + 5, interval=0.1)
    # a local call (the rule does not count it) goes; a sixth distinct international
    # number keeps the sweep at critical: it crosses again, a new block
    after = lab.run_uac(proxy, [(MALLORY, "", LOCAL), (MALLORY, "", SWEEP[5])],
                        concurrent=1, rate=10)
    assert after.returncode == 0, after.output
    assert outcomes(after) == [(MALLORY, LOCAL, "answered"),
                               (MALLORY, SWEEP[5], "403 Fraud Suspected")]
    assert [(b["rule"], b["value"]) for b in blocks(lab)] == [(RULE, MALLORY)]
    again = alerts(lab)
    assert [(e["level"], e["count"]) for e in again] == [
        ("warning", 3), ("critical", 5), ("critical", 6)]
