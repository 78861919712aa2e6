"""Kamailio + policer end to end (issue 3): real Redis, real Kamailio started by
deploy/kamailio/run, real SIP from SIPp. Every test runs once per flavour
(``native``: kamailio.cfg + policer.cfg; ``kemi``: policer_kemi.py); see
conftest.py for the harness.

Run: ``.venv/bin/pytest -m e2e tests/e2e`` (about a minute and a half).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import redis

from lab.redis_server import RedisServer
from tests.support.e2e import Lab, UacResult

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HOLD_MS = 4000


def _ok(res: UacResult) -> None:
    assert res.returncode == 0, f"sipp exited {res.returncode}\n{res.output}"


def _reasons(lab: Lab, call_ids: list[str]) -> Counter[str]:
    wanted = set(call_ids)
    return Counter(c["Reason"] for c in lab.cdrs() if c.get("CallID") in wanted)


# 1 ---------------------------------------------------------------------------------


def test_total_limit_admits_exactly_n(lab: Lab) -> None:
    lab.use_policy("basic")  # total max 3, 503 "Call Limit Reached", Retry-After 7
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)

    uac = lab.start_uac(proxy, [(f"user{i}", "", f"1000{i}") for i in range(9)], hold_ms=HOLD_MS)
    assert lab.wait_size("total", 3, timeout=5) == 3
    assert proxy.active_dialogs() == 3
    # Kamailio's dialog timeout is the policy's timeouts.dialog (60s).
    lifetimes = set(re.findall(r"lifetime: (\d+)", proxy.kamcmd("dlg.list")))
    assert lifetimes == {"60"}

    res = uac.result()
    _ok(res)
    assert len(res.answered) == 3 and len(res.ended) == 3
    assert res.codes() == [503] * 6
    assert {(reason, retry) for _, reason, retry, _ in res.rejected} == {
        ("Call Limit Reached", "7")
    }
    # rejected INVITEs never reached the upstream
    assert sum(line.startswith("INVITE ") for line in uas.lines()) == 3

    assert lab.wait_size("total", 0) == 0
    stats = lab.stats()
    assert stats["active"] == 0 and stats["early"] == 0
    assert stats["rejected"] == 6
    assert proxy.active_dialogs() == 0
    assert _reasons(lab, res.answered) == Counter(bye=3)


# 2 ---------------------------------------------------------------------------------


def test_two_proxies_share_one_limit(lab: Lab) -> None:
    lab.use_policy("basic")  # total max 3
    uas = lab.start_uas("uas.xml")
    a = lab.start_proxy(upstream_port=uas.port, node="proxy-a")
    b = lab.start_proxy(upstream_port=uas.port, node="proxy-b")

    first = lab.start_uac(a, [(f"a{i}", "", "2000") for i in range(2)], hold_ms=HOLD_MS + 3000)
    assert lab.wait_size("total", 2, timeout=5) == 2
    # B sees A's calls: one slot left for four callers.
    second = lab.start_uac(b, [(f"b{i}", "", "2000") for i in range(4)], hold_ms=HOLD_MS)
    assert lab.wait_size("total", 3, timeout=5) == 3

    # Then callers on both at once while the limit is reached: all rejected.
    both = [lab.start_uac(p, [(f"{p.node}-{i}", "", "2000") for i in range(3)]) for p in (a, b)]
    for r in (u.result() for u in both):
        _ok(r)
        assert r.answered == [] and r.codes() == [503] * 3

    res_b = second.result()
    _ok(res_b)
    assert len(res_b.answered) == 1
    assert res_b.codes() == [503] * 3
    res_a = first.result()
    _ok(res_a)
    assert len(res_a.answered) == 2
    assert lab.wait_size("total", 0) == 0
    assert a.active_dialogs() == 0 and b.active_dialogs() == 0

    # And a burst spread over both proxies: exactly three answered in all.
    burst = [
        lab.start_uac(p, [(f"{p.node}-x{i}", "", "2001") for i in range(4)], hold_ms=HOLD_MS)
        for p in (a, b)
    ]
    results = [u.result() for u in burst]
    for r in results:
        _ok(r)
    assert sum(len(r.answered) for r in results) == 3
    assert sum(len(r.rejected) for r in results) == 5
    assert lab.wait_size("total", 0) == 0


# 3 ---------------------------------------------------------------------------------


def test_account_user_and_class_caps(lab: Lab) -> None:
    lab.use_policy("classes")
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)

    calls = (
        [(f"acc{i}", "acme", "5551") for i in range(4)]  # account acme: max 2 (486)
        + [("bob", "", "5552") for _ in range(3)]  # user bob: max 1 (503)
        + [(f"int{i}", "", "0044201234") for i in range(3)]  # international: max 1 (403)
        + [(f"dom{i}", "", "0301234") for i in range(3)]  # domestic: max 2 (480)
    )
    uac = lab.start_uac(proxy, calls, hold_ms=HOLD_MS)
    assert lab.wait_size("total", 6, timeout=5) == 6
    assert lab.size("account", "acme") == 2
    assert lab.size("user", "bob") == 1
    assert lab.size("international") == 1
    assert lab.size("domestic") == 2
    assert lab.size("local") == 3

    res = uac.result()
    _ok(res)
    answered = Counter(kind(c) for c in res.answered_calls())
    assert answered == Counter(acme=2, bob=1, international=1, domestic=2)
    rejected = Counter((kind(c), code, reason) for c, code, reason in res.rejected_calls())
    assert rejected == Counter(
        {
            ("acme", 486, "Account Call Limit"): 2,
            ("bob", 503, "User Call Limit"): 2,
            ("international", 403, "International Limit"): 2,
            ("domestic", 480, "Domestic Limit"): 1,
        }
    )
    assert lab.wait_size("total", 0) == 0
    for profile, value in (
        ("account", "acme"),
        ("user", "bob"),
        ("international", None),
        ("domestic", None),
        ("local", None),
    ):
        assert lab.size(profile, value) == 0


def kind(call: tuple[str, str, str]) -> str:
    user, account, number = call
    if account:
        return account
    if user == "bob":
        return user
    return "international" if number.startswith("00") else "domestic"


# 4 ---------------------------------------------------------------------------------


def test_emergency_admitted_when_full_and_counted(lab: Lab) -> None:
    lab.use_policy("emergency")  # total max 2; 112 and 911 bypass
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)

    filler = lab.start_uac(proxy, [("f1", "", "5550"), ("f2", "", "5551")], hold_ms=HOLD_MS + 3000)
    assert lab.wait_size("total", 2, timeout=5) == 2

    uac = lab.start_uac(
        proxy, [("e1", "", "112"), ("e2", "", "911"), ("n1", "", "5553")], hold_ms=HOLD_MS
    )
    assert lab.wait_size("emergency", 2, timeout=5) == 2
    assert lab.size("total") == 4  # counted, over the limit
    res = uac.result()
    _ok(res)
    assert sorted(c[2] for c in res.answered_calls()) == ["112", "911"]
    assert [(c[2], code) for c, code, _ in res.rejected_calls()] == [("5553", 503)]

    _ok(filler.result())
    assert lab.wait_size("total", 0) == 0
    assert lab.size("emergency") == 0


# 5 ---------------------------------------------------------------------------------


def test_busy_cancelled_and_unanswered_calls_are_released(lab: Lab) -> None:
    lab.use_policy("basic")  # early 10s in the policy ...
    uas = lab.start_uas("uas_busy.xml")
    # ... but Kamailio gives up on unanswered INVITEs after 2s: counts must drop
    # by release, long before the policy's early deadline would expire them.
    proxy = lab.start_proxy(upstream_port=uas.port, env={"POLICER_EARLY_TIMEOUT": "2"})
    calls = [(f"u{i}", "", "3000") for i in range(3)]

    busy = lab.run_uac(proxy, calls)
    _ok(busy)
    assert busy.codes() == [486] * 3
    assert lab.wait_size("total", 0, timeout=2) == 0
    uas.stop()

    uas = lab.start_uas("uas_noanswer.xml", port=uas.port)
    cancel = lab.start_uac(proxy, calls, scenario="uac_cancel.xml", hold_ms=1000)
    assert lab.wait_size("total", 3, timeout=2) == 3
    res_cancel = cancel.result()
    _ok(res_cancel)
    assert len(res_cancel.cancelled) == 3
    assert lab.wait_size("total", 0, timeout=2) == 0

    unanswered = lab.start_uac(proxy, calls)
    assert lab.wait_size("total", 3, timeout=2) == 3
    res_unanswered = unanswered.result()
    _ok(res_unanswered)
    assert res_unanswered.codes() == [408] * 3
    assert lab.wait_size("total", 0, timeout=2) == 0

    stats = lab.stats()
    assert stats["active"] == 0 and stats["early"] == 0
    assert proxy.active_dialogs() == 0
    assert _reasons(lab, [cid for *_, cid in busy.rejected]) == Counter(failed=3)
    assert _reasons(lab, res_cancel.cancelled) == Counter(cancel=3)
    assert _reasons(lab, [cid for *_, cid in res_unanswered.rejected]) == Counter(failed=3)


# 6 ---------------------------------------------------------------------------------


def test_upstream_auth_counts_the_call_once(lab: Lab) -> None:
    lab.use_policy("basic")
    uas = lab.start_uas("uas_auth.xml")  # 401 first, 200 to the re-sent INVITE
    proxy = lab.start_proxy(
        upstream_port=uas.port,
        env={
            "POLICER_UPSTREAM_AUTH_USER": "trunkuser",
            "POLICER_UPSTREAM_AUTH_PASSWORD": "s3cret",
        },
    )

    uac = lab.start_uac(proxy, [("alice", "", "4000")], hold_ms=HOLD_MS)
    assert lab.wait_size("total", 1, timeout=5) == 1
    assert proxy.active_dialogs() == 1
    res = uac.result()
    _ok(res)
    assert len(res.answered) == 1 and len(res.ended) == 1
    call_id = res.answered[0]

    seen = {
        m.group(1): int(m.group(2))
        for line in uas.lines()
        if (m := re.match(rf"^(INVITE|AUTHORIZED) {re.escape(call_id)} cseq=(\d+)", line))
    }
    assert seen["AUTHORIZED"] == seen["INVITE"] + 1
    assert lab.wait_size("total", 0) == 0
    assert _reasons(lab, [call_id]) == Counter(bye=1)  # one dialog, one record
    assert lab.stats()["rejected"] == 0


# 7 ---------------------------------------------------------------------------------


def test_kamailio_dialog_timeout_releases(lab: Lab) -> None:
    lab.use_policy("basic")  # dialog 60s in the policy; Kamailio told 2s here, so
    uas = lab.start_uas("uas.xml")  # only its timeout can bring the count down soon
    proxy = lab.start_proxy(upstream_port=uas.port, env={"POLICER_DIALOG_TIMEOUT": "2"})

    res = lab.run_uac(proxy, [("alice", "", "5000")], scenario="uac_nobye.xml")
    _ok(res)
    assert len(res.answered) == 1
    assert lab.size("total") == 1
    assert lab.wait_size("total", 0, timeout=8) == 0
    assert proxy.active_dialogs() == 0
    assert _reasons(lab, res.answered) == Counter(timeout=1)


# Redis down ---------------------------------------------------------------------------


def test_store_error_answers_by_policy_and_logs_call_id(lab: Lab) -> None:
    lab.use_policy("emergency")  # on_store_error: reject; 112 and 911 still go through
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        private.kill()  # Redis gone after the proxy started

        res = lab.run_uac(proxy, [("alice", "", "5550"), ("e1", "", "112")], hold_ms=500)
    _ok(res)
    assert [c[2] for c in res.answered_calls()] == ["112"]
    assert [(c[2], code, reason) for c, code, reason in res.rejected_calls()] == [
        ("5550", 503, "Call Limit Reached")
    ]
    log = proxy.log.read_text(errors="replace")
    for call_id in (*res.answered, *(cid for *_, cid in res.rejected)):
        assert re.search(
            rf"store_error.*{re.escape(call_id)}|{re.escape(call_id)}.*store_error", log
        )


# Hostile values -------------------------------------------------------------------------


def test_hostile_header_values_count_under_their_own_value(lab: Lab) -> None:
    """X-Account values full of hash-tag braces, separators, '%', '$' (a cfg variable's
    marker) and the text a null cfg variable prints: each is counted under its own
    value, never another's, never as a missing header, and no key leaves the namespace."""
    lab.use_policy("classes")  # account max 2 (486)
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)
    nasty = "{a}:b%41$var(x)"
    calls = [
        (f"h{i}", nasty, f"55{i}") for i in range(3)
    ] + [("h3", "{a}:b", "553"), ("h4", "<null>", "554"), ("h5", "0:", "555"), ("h6", "", "556")]
    uac = lab.start_uac(proxy, calls, hold_ms=HOLD_MS)
    assert lab.wait_size("total", 6, timeout=5) == 6
    assert lab.size("account", nasty) == 2
    assert lab.size("account", "{a}:b") == 1
    assert lab.size("account", "<null>") == 1
    assert lab.size("account", "0:") == 1
    res = uac.result()
    _ok(res)
    assert len(res.answered) == 6
    assert [(c[1], code) for c, code, _ in res.rejected_calls()] == [(nasty, 486)]
    client = redis.Redis.from_url(lab.redis_url, decode_responses=True)
    prefix = f"policer:{{{lab.namespace}}}:"
    keys = list(client.scan_iter(match=prefix + "*"))
    assert keys and all("{" not in k[len(prefix):] and "}" not in k[len(prefix):]
                        for k in keys)
    client.close()
    assert lab.wait_size("total", 0) == 0
