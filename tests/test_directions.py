"""Call direction: a call's source IP picks its direction (``directions``), and a
profile counts only the directions it names (``when.direction``). Inbound calls from
carriers' trunks and outbound calls from subscribers are capped apart, on both stores,
and the decision says which direction a call had."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policer.classify import Classifier, parse_ip
from policer.policy import Policy
from policer.store import RedisStore, Store
from tests.support import EngineFactory, call
from tests.support.cli import run_cli
from tests.support.policies import build_policy, policy_errors, policy_yaml

DIRECTIONS = {
    "inbound": {"sources": ["192.0.2.0/24", "2001:db8:1::/48", "198.51.100.7"]},
    "outbound": {"default": True},
}


def direction_policy(directions: object = None) -> Policy:
    directions = DIRECTIONS if directions is None else directions
    profiles: dict[str, object] = {"inbound": {"when": {"direction": "inbound"}},
                                   "outbound": {"when": {"direction": ["outbound"]}},
                                   "total": {}}
    if "outbound" not in directions:  # type: ignore[operator]
        del profiles["outbound"]
    return build_policy("dir", version=2, directions=directions, profiles=profiles,
                        limits={"inbound": 2, **({"outbound": 1} if "outbound" in profiles
                                                 else {})})


def test_inbound_and_outbound_calls_are_capped_apart(engine_for: EngineFactory,
                                                      store: Store) -> None:
    e = engine_for(direction_policy())
    carrier = [e.admit(call("5551000", source_ip=ip)) for ip in
               ("192.0.2.10", "2001:db8:1:ff::9", "198.51.100.7")]
    assert [(d.admitted, d.direction) for d in carrier] == [
        (True, "inbound"), (True, "inbound"), (False, "inbound")]
    assert (carrier[2].limit, carrier[2].count, carrier[2].max) == ("inbound", 2, 2)
    # a subscriber's call is outbound (the default): the full inbound cap does not touch it
    sub = e.admit(call("5551000", source_ip="203.0.113.5"))
    assert (sub.admitted, sub.direction, sub.memberships) == (True, "outbound",
                                                              ("outbound", "total"))
    again = e.admit(call("5551000", source_ip="10.1.1.1"))
    assert (again.admitted, again.limit, again.direction) == (False, "outbound", "outbound")
    assert store.profile_size("inbound") == 2
    assert store.profile_size("outbound") == 1
    assert store.profile_size("total") == 3
    assert e.admit(call("5551000", source_ip="192.0.2.10")).as_dict()["direction"] == "inbound"


@pytest.mark.parametrize("ip, direction", [
    ("[2001:db8:1::5]", "inbound"),           # brackets, as some stacks print $si
    ("fe80::1%eth0", "outbound"),              # a zone is dropped
    ("2001:db8:1::5%eth0", "inbound"),
    ("::ffff:192.0.2.1", "inbound"),           # IPv4-mapped IPv6 is its IPv4 address
    ("192.0.2.1:5060", "outbound"),            # not an address: the default direction
    ("", "outbound"),
    ("0192.0.2.1", "outbound"),
    ("192.0.2.256", "outbound"),
    ("\udcff\udcfe", "outbound"),              # bytes that are not UTF-8
    ("x" * 5000, "outbound"),
])
def test_any_source_ip_gets_a_direction(engine_for: EngineFactory, ip: str,
                                        direction: str) -> None:
    e = engine_for(direction_policy())
    d = e.admit(call("5551000", source_ip=ip))
    assert d.direction == direction and not d.fallback


def test_without_a_default_an_unmatched_call_joins_no_directed_profile(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(direction_policy(directions={"inbound": DIRECTIONS["inbound"]}))
    d = e.admit(call("5551000", source_ip="203.0.113.5"))
    assert (d.admitted, d.direction, d.memberships) == (True, None, ("total",))
    assert e.explain(call("5551000", source_ip="192.0.2.4")).as_dict()["direction"] == \
        "inbound"


def test_a_policy_without_directions_says_none(engine_for: EngineFactory) -> None:
    e = engine_for(build_policy("nodir", profiles={"total": {}}, limits={"total": 3}))
    assert e.admit(call("5551000", source_ip="192.0.2.1")).direction is None


def test_the_first_listed_direction_wins(engine_for: EngineFactory) -> None:
    e = engine_for(direction_policy(directions={
        "peering": {"sources": ["192.0.2.128/25"]},
        "inbound": {"sources": ["192.0.2.0/24"]},
        "outbound": {"default": True}}))
    assert e.admit(call("1", source_ip="192.0.2.200")).direction == "peering"
    assert e.admit(call("1", source_ip="192.0.2.100")).direction == "inbound"


def test_policy_errors_name_the_place(tmp_path: Path) -> None:
    assert policy_errors(tmp_path / "dir.yaml", (
        "version: 2\nnamespace: x\n"
        "directions:\n"
        "  inbound: {sources: [10.0.0.1/8, 192.0.2.0/24, nonsense]}\n"
        "  peer: {sources: [192.0.2.5]}\n"
        "  out: {default: true}\n"
        "  also: {default: true}\n"
        "  both: {default: true, sources: [10.9.0.0/16]}\n"
        "  empty: {}\n"
        "profiles:\n  t: {when: {direction: [outbund]}}\n")) == [
        "4:23: directions.inbound.sources[0]: 10.0.0.1/8 has host bits set; did you mean "
        "10.0.0.0/8?",
        "4:49: directions.inbound.sources[2]: not a CIDR network: 'nonsense' ('nonsense' "
        "does not appear to be an IPv4 or IPv6 network)",
        "5:20: directions.peer.sources[0]: unreachable: 192.0.2.5/32 is inside "
        "192.0.2.0/24 of directions.inbound (the first listed match wins)",
        "7:19: directions.also.default: direction 'out' is already the default",
        "8:19: directions.both.default: direction 'out' is already the default",
        "8:19: directions.both.default: a direction has sources or is the default, not both",
        "9:10: directions.empty: a direction needs sources (CIDR networks) or default: true",
        "11:25: profiles.t.when.direction: unknown direction 'outbund' (did you mean "
        "'out'?)",
    ]


#: most specific first (a network inside an earlier one is an error)
NETS = ["1.2.3.4/32", "::1/128", "203.0.113.64/26", "192.0.2.0/24", "2001:db8:0:1::/64",
        "2001:db8:8000::/33", "2001:db8::/32", "10.0.0.0/8", "fe80::/10", "0.0.0.0/1",
        "::/3"]


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """Source IPs as a proxy or a hostile HTTP client may send them: real addresses of
    both families in their usual spellings, and near misses."""
    kind = draw(st.sampled_from(["v4", "v6", "mapped", "junk", "mutated", "listed"]))
    if kind == "listed":  # inside (or at the edge of) a network a direction lists
        return str(draw(st.ip_addresses(network=draw(st.sampled_from(NETS)))))
    if kind == "v4":
        return str(draw(st.ip_addresses(v=4)))
    if kind == "v6":
        a = draw(st.ip_addresses(v=6))
        return draw(st.sampled_from([str(a), a.exploded, f"[{a}]", f"{a}%eth0",
                                     str(a).upper()]))
    if kind == "mapped":
        return f"::ffff:{draw(st.ip_addresses(v=4))}"
    if kind == "junk":
        return draw(st.text(alphabet="0123456789abcdefABCDEF:.[]%x ", max_size=48))
    s = str(draw(st.ip_addresses()))
    i = draw(st.integers(0, len(s)))
    return s[:i] + draw(st.sampled_from(["", ":", ".", "0", "::", "1", "g"])) + s[i + 1:]




def test_lua_reads_source_ips_as_python_does(redis_store: RedisStore) -> None:
    """The library's parse_ip and in_net against Python's ipaddress, on every kind of
    spelling: one direction per network, so the direction names the network matched."""
    directions = {f"n{i}": {"sources": [n]} for i, n in enumerate(NETS)}
    policy = build_policy(redis_store.namespace, version=2, directions=directions,
                          profiles={"total": {}})
    redis_store.load(policy)
    classifier = Classifier(policy)

    @settings(max_examples=400, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ip=addresses())
    def check(ip: str) -> None:
        r = redis_store.explain_call(call("1", source_ip=ip))
        assert r.direction == classifier.direction(ip), ip
        addr = parse_ip(ip)
        if addr is not None:
            first = next((f"n{i}" for i, n in enumerate(NETS)
                          if addr in ipaddress.ip_network(n)), None)
            assert r.direction == first

    check()


def test_cli_admit_and_explain_take_the_source_ip(tmp_path: Path,
                                                  env: dict[str, str]) -> None:
    text = policy_yaml("dircli", version=2, directions=DIRECTIONS,
                       profiles={"inbound": {"when": {"direction": "inbound"}}},
                       limits={"inbound": 1})
    path = tmp_path / "p.yaml"
    path.write_text(text)
    base = ("--policy", str(path))
    out = run_cli("explain", *base, "--to", "5551000", "--source-ip", "192.0.2.9",
                  env=env)
    assert out.returncode == 0, out.stderr
    assert "direction   inbound" in out.stdout
    got = run_cli("admit", *base, "--to", "5551000", "--source-ip", "192.0.2.9",
                  "--json", env=env)
    assert json.loads(got.stdout)["direction"] == "inbound"
    full = run_cli("admit", *base, "--to", "5551000", "--source-ip", "192.0.2.10",
                   "--call-id", "second", "--json", env=env)
    assert full.returncode == 1
    assert (json.loads(full.stdout)["limit"], json.loads(full.stdout)["direction"]) == (
        "inbound", "inbound")
