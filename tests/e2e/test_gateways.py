"""Egress gateways through Kamailio's dispatcher (kamailio.cfg and kemi.cfg
WITH_GATEWAYS, the native and KEMI flavours): three SIPp gateways in priority order,
capped at 2, 2 and (almost) none by policer. A call goes to the first gateway with room;
a gateway that fails (503) frees its slot at once and the call moves on; when every
gateway is full the call gets the gateway limit's reject. Every count equals the calls
up, and returns to 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.redis_server import RedisServer, free_udp_port
from tests.support.e2e import POLICIES, Lab, Proxy, Uas

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HOLD_MS = 6000
PLACEHOLDERS = ("127.0.0.1:15061", "127.0.0.1:15062", "127.0.0.1:15063")


@pytest.fixture(params=["native", "kemi"])
def lab(request: pytest.FixtureRequest, e2e_redis: RedisServer,
           tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(str(request.param), e2e_redis.url, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def start(lab: Lab, scenarios: tuple[str, str, str]) -> tuple[Proxy, list[Uas], list[str]]:
    """The gateways (SIPp UASes), the policy naming their ports, the proxy."""
    ports = [free_udp_port() for _ in scenarios]
    gws = [f"127.0.0.1:{p}" for p in ports]
    text = (POLICIES / "gateways.yaml").read_text()
    for old, new in zip(PLACEHOLDERS, gws, strict=True):
        text = text.replace(old, new)
    (lab.workdir / "gateways-src.yaml").write_text(text)
    lab.use_policy_file(lab.workdir / "gateways-src.yaml")
    uases = [lab.start_uas(s, port=p) for s, p in zip(scenarios, ports, strict=True)]
    listing = lab.workdir / "gateways.list"
    listing.write_text("".join(f"1 sip:{gw} 0 {3 - i}\n" for i, gw in enumerate(gws)))
    proxy = lab.start_proxy(upstream_port=ports[2],
                            env={"POLICER_GATEWAYS": str(listing)})
    return proxy, uases, gws


def invites(uas: Uas) -> int:
    return sum(line.startswith("INVITE ") for line in uas.lines())


def test_calls_fill_the_gateways_in_order_and_the_rest_get_the_limits_reject(
        lab: Lab) -> None:
    proxy, uases, gws = start(lab, ("uas.xml", "uas.xml", "uas.xml"))
    lab.policer("limits", "set", "trunk", gws[2], "1")  # the last gateway: one call
    uac = lab.start_uac(proxy, [(f"u{i}", "", "5551000") for i in range(6)],
                        hold_ms=HOLD_MS, rate=5)
    for gw, n in zip(gws, (2, 2, 1), strict=True):
        assert lab.wait_size("trunk", n, value=gw, timeout=10) == n
    assert lab.size("carrier", "acme") == 5
    assert lab.size("total") == 5
    res = uac.result()
    assert res.returncode == 0, res.output
    assert len(res.answered) == 5
    assert [(code, reason) for code, reason, _, _ in res.rejected] == [
        (503, "All Trunks Busy")]
    # the failover order: full gateways were skipped, never tried
    assert [invites(u) for u in uases] == [2, 2, 1]
    for gw in gws:
        assert lab.wait_size("trunk", 0, value=gw) == 0
    assert lab.size("carrier", "acme") == 0 and lab.size("total") == 0
    assert proxy.active_dialogs() == 0


def test_a_failing_gateway_frees_its_slot_at_once(lab: Lab) -> None:
    proxy, uases, gws = start(lab, ("uas_unavailable.xml", "uas.xml", "uas.xml"))
    uac = lab.start_uac(proxy, [(f"u{i}", "", "5551000") for i in range(4)],
                        hold_ms=HOLD_MS, rate=5)
    # each call tried the first gateway (503), then the second while it had room
    for gw, n in zip(gws, (0, 2, 2), strict=True):
        assert lab.wait_size("trunk", n, value=gw, timeout=10) == n
    assert lab.size("carrier", "acme") == 4  # moved with each call, never counted twice
    res = uac.result()
    assert res.returncode == 0, res.output
    assert len(res.answered) == 4 and not res.rejected
    assert [invites(u) for u in uases] == [4, 2, 2]
    for gw in gws:
        assert lab.wait_size("trunk", 0, value=gw) == 0
    assert lab.size("carrier", "acme") == 0 and lab.size("total") == 0
