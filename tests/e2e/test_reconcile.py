"""``policer reconcile`` against real Kamailio proxies: Redis loses its state
while calls are up (restarted empty); the proxies' own dialog lists, read over
their JSON-RPC socket, bring every count back, header-valued profiles
included (the adapter keeps the call's attributes in $dlg_var(policer_call))."""

from __future__ import annotations

import json

import pytest

from lab.redis_server import RedisServer
from tests.support.e2e import Lab

from .test_queue import wait_library

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_reconcile_rebuilds_counts_after_redis_restarted_empty(lab: Lab) -> None:
    lab.use_policy("classes")
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        lab.start_uac(proxy, [("alice", "acme", "5551"), ("bob", "acme", "0301234")],
                            hold_ms=20_000)
        assert lab.wait_size("total", 2, timeout=10) == 2
        private.restart()  # empty: every count is gone, the calls are still up
        # the proxy's timer loads the policy's library again within a second and puts
        # its calls back on its own (tests/e2e/test_live_counts.py); reconcile, run by an
        # operator who wants it, then finds them all counted, header-valued ones too
        assert wait_library(lab, 2)
        assert lab.wait_size("total", 2, timeout=8) == 2
        out = json.loads(lab.policer(
            "reconcile", "--proxy", f"{proxy.node}=fifo:{proxy.runtime_dir}/kamailio_rpc.fifo",
            "--json"))
        assert out[0]["added"] == [] and out[0]["kept"] == 2 and out[0]["partial"] == []
        assert lab.size("total") == 2
        assert lab.size("account", "acme") == 2
        assert lab.size("user", "alice") == 1


def test_reconcile_reads_a_busy_proxy_over_the_fifo(lab: Lab) -> None:
    """100 dialogs: far more than one JSON-RPC datagram (64 KB) can carry."""
    lab.use_policy("classes")  # total max 100
    with RedisServer() as private:
        lab.redis_url = private.url
        uas = lab.start_uas("uas.xml")
        proxy = lab.start_proxy(upstream_port=uas.port)
        lab.start_uac(proxy, [(f"busy{i}", "", f"55{i:03d}") for i in range(100)],
                      hold_ms=25_000, rate=200)
        assert lab.wait_size("total", 100, timeout=20) == 100
        private.restart()
        assert wait_library(lab, 2)
        out = json.loads(lab.policer(
            "reconcile", "--proxy", f"{proxy.node}=fifo:{proxy.runtime_dir}/kamailio_rpc.fifo",
            "--json"))
        # (the proxy puts them back on its own too: whichever came first counted them)
        assert out[0]["proxy_dialogs"] == 100
        assert len(out[0]["added"]) + out[0]["kept"] == 100
        assert lab.size("total") == 100
