"""policies/wholesale.yaml, the carrier example of docs/policy.md, does what its
comments say, on both stores."""

from __future__ import annotations

from pathlib import Path

from policer.policy import load_policy
from policer.store import Store
from tests.support import EngineFactory, call

WHOLESALE = Path(__file__).resolve().parents[1] / "policies" / "wholesale.yaml"


def test_the_wholesale_example(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(load_policy(WHOLESALE))
    peer = e.admit(call("4930123", "peer", source_ip="198.51.100.7"))
    assert (peer.admitted, peer.direction, peer.memberships) == (
        True, "inbound", ("total", "inbound"))
    out = e.admit(call("4930123", "alice", source_ip="10.1.2.3",
                       headers={"X-Account": "acme"}))
    assert (out.direction, out.memberships) == (
        "outbound", ("total", "outbound", "customer=acme", "reseller=r-north"))
    orphan = e.admit(call("4930123", "zed", source_ip="10.1.2.4",
                          headers={"X-Account": "nobody"}))
    assert (orphan.admitted, orphan.code, orphan.reason, orphan.kind) == (
        False, 486, "Reseller Call Limit", "parent")
    sent = store.egress(out.dialog_id, "203.0.113.10:5060")
    assert sent.taken and sent.memberships == ("trunk=203.0.113.10:5060", "carrier=tier1")
    # an emergency call passes without a reseller
    assert e.admit(call("112", "zed", source_ip="10.1.2.4",
                        headers={"X-Account": "nobody"})).admitted
