"""Policy language v2 through Kamailio (issue 9), both flavours: a burst over a call
rate is answered with the limit's ``rate_reject`` code and a Retry-After, and an
answered call held past its ``max_duration`` is ended by the proxy with a BYE to
each side and recorded with reason ``duration_cap``. See conftest.py for the harness.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.support import wait_for
from tests.support.e2e import Lab, UacResult

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def _ok(res: UacResult) -> None:
    assert res.returncode == 0, f"sipp exited {res.returncode}\n{res.output}"


def _reasons(lab: Lab, call_ids: list[str]) -> Counter[str]:
    wanted = set(call_ids)
    return Counter(c["Reason"] for c in lab.cdrs() if c.get("CallID") in wanted)


def test_a_burst_over_the_rate_gets_the_rate_reject_code_with_retry_after(lab: Lab) -> None:
    lab.use_policy("v2")  # account: 2 calls a minute, 503 "Call Rate Exceeded"
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)

    res = lab.run_uac(proxy, [(f"user{i}", "acme", f"1000{i}") for i in range(6)])
    _ok(res)
    assert len(res.answered) == 2 and len(res.ended) == 2
    assert res.codes() == [503] * 4
    assert {reason for _, reason, _, _ in res.rejected} == {"Call Rate Exceeded"}
    # Retry-After: the seconds until the next call would pass (at least 1)
    assert all(retry.isdigit() and int(retry) >= 1 for _, _, retry, _ in res.rejected), res.rejected
    # rejected INVITEs never reached the upstream
    assert sum(line.startswith("INVITE ") for line in uas.lines()) == 2

    # the rate is per account: another account's call still passes
    other = lab.run_uac(proxy, [("user9", "globex", "10009")])
    _ok(other)
    assert len(other.answered) == 1 and other.rejected == []

    assert lab.wait_size("total", 0) == 0
    stats = lab.stats()
    assert stats["rejected"] == 4 and stats["active"] == 0
    assert _reasons(lab, res.answered + other.answered) == Counter(bye=3)


def test_a_call_held_past_max_duration_is_ended_by_the_proxy(lab: Lab) -> None:
    lab.use_policy("v2")  # every answered call: max_duration 2s
    uas = lab.start_uas("uas.xml")
    proxy = lab.start_proxy(upstream_port=uas.port)

    # the caller never hangs up: it waits for a BYE (at most its 30 s recv timeout)
    uac = lab.start_uac(proxy, [("caller", "acme", "20001")], scenario="uac_held.xml")
    res = uac.result()
    _ok(res)
    assert len(res.answered) == 1
    (call_id,) = res.answered
    # the proxy sent a BYE to each side
    assert f"BYE {call_id}" in uac.log.read_text()
    assert f"BYE {call_id}" in uas.lines()

    assert lab.wait_size("total", 0) == 0
    assert wait_for(lambda: proxy.active_dialogs() == 0, 10)
    assert wait_for(lambda: _reasons(lab, [call_id]) == Counter(duration_cap=1), 10), \
        _reasons(lab, [call_id])
    stats = lab.stats()
    assert stats["active"] == 0 and stats["early"] == 0
