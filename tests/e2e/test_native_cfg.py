"""The native flavour's generated cfg (``policer.adapters.kamailio_cfg``) without
running Kamailio's SIP side: what it packs, the commands, the ndb_redis server and
bounds, and that Kamailio accepts the whole configuration (``kamailio -c``) for
every policy here. Not marked e2e (no proxy runs; the check needs the binary)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from policer.adapters.kamailio_cfg import (
    GENERATED_NAME,
    generate,
    kept_value,
    main,
    ndb_server,
    ndb_timeouts,
)
from policer.call import Call, pack_fields
from policer.compile import compile_policy
from policer.policy import load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
POLICIES = sorted([*(ROOT / "tests" / "e2e" / "policies").glob("*.yaml"),
                   ROOT / "policies" / "example.yaml"])
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"


def test_attributes_are_packed_in_the_library_order_nulls_as_empty() -> None:
    policy = load_policy(ROOT / "tests" / "e2e" / "policies" / "classes.yaml")
    gen = generate(policy, "proxy-a", "redis://127.0.0.1:6379/0")
    library = compile_policy(policy)
    assert gen.attributes == library.attributes == (
        "ruri_user", "from_user", "from_domain", "source_ip", "header:x-account")
    route = gen.text[gen.text.index("route[POLICER_ATTRS]"):]
    route = route[:route.index("\n}")]
    pvs = ["$rU", "$fU", "$fd", "$si", "$hdr(x-account)"]
    at = [route.index(f'$({pv[1:]}{{s.len}}) + ":" + {pv};') for pv in pvs]
    assert at == sorted(at)
    nullable = ["$rU", "$fU", "$hdr(x-account)"]  # $fd and $si: a parsed request has them
    assert all(f"if ({pv} == $null)" in route for pv in nullable)
    assert route.count('+ "0:";') == len(nullable)
    assert '$(hdr(x-account){s.len}) + ":" + $hdr(x-account);' in route
    # mode A (a node holding a lease), no clock offset, the attribute list's signature,
    # no explain instant, and the deadline: the worker's clock when it sent the command
    # and the ms to add for Redis's clock (both expanded by ndb_redis)
    assert gen.defines["POLICER_ADMIT_CMD"] == (
        f'"FCALL {library.function("admit")} 1 {library.prefix} proxy-a %s %s %s A 0 '
        f'{library.attributes_sig} - $var(policer_sent) $var(policer_dla)"')
    assert gen.defines["POLICER_BATCH_CMD"] == (
        f'"FCALL {library.function("batch")} 1 {library.prefix} %s 0 0 '
        f'{library.attributes_sig}"')
    assert gen.defines["POLICER_NODE_FIELD"] == '"7:proxy-a"'


def test_an_encoded_node_is_written_for_hiredis() -> None:
    policy = load_policy(ROOT / "tests" / "e2e" / "policies" / "basic.yaml")
    gen = generate(policy, "edge 1/a", "redis://127.0.0.1:6379/0")
    # key_part('edge 1/a') = 'edge%201%2Fa'; hiredis reads '%%' as one '%'
    assert " edge%%201%%2Fa %s %s %s A 0 " in gen.defines["POLICER_ADMIT_CMD"]
    assert gen.defines["POLICER_NODE_FIELD"] == '"8:edge 1/a"'  # the function encodes it
    with pytest.raises(ValueError):
        generate(policy, 'a"b\nc', "redis://127.0.0.1:6379/0")


def test_headers_the_cfg_cannot_name_are_refused() -> None:
    policy = parse_policy("""
version: 1
namespace: h
call: {attributes: {weird: "header:X-A$b"}}
profiles: {total: {}, weird: {value: weird}}
""")
    with pytest.raises(ValueError, match="kemi"):
        generate(policy, "n", "redis://127.0.0.1:6379/0")


def test_kept_attributes_come_back_for_reconcile() -> None:
    sources = ("ruri_user", "from_user", "from_domain", "source_ip", "header:x-account")
    values = ["5551", "al;ice", "", "127.0.0.1", "{acme}\xff"]
    kept = kept_value(sources, pack_fields(values))
    call = Call.from_json("c1", "t1", kept)
    assert (call.ruri_user, call.from_user, call.source_ip) == ("5551", "al;ice", "127.0.0.1")
    assert call.headers == {"x-account": "{acme}\xff"}
    assert Call.from_json("c1", "t1", "policer-attrs;x;not base64!").from_user == ""


@pytest.mark.parametrize(("url", "server"), [
    ("redis://127.0.0.1:6379/0", "name=policer;addr=127.0.0.1;port=6379;db=0"),
    ("redis://:s3cret@10.0.0.5/3", "name=policer;addr=10.0.0.5;port=6379;db=3;pass=s3cret"),
    ("redis://default:pw@h:7000", "name=policer;addr=h;port=7000;db=0;pass=pw"),
    ("unix:///run/redis.sock?db=2", "name=policer;unix=/run/redis.sock;db=2"),
])
def test_ndb_redis_server_from_the_store_url(url: str, server: str) -> None:
    assert ndb_server(url) == server


@pytest.mark.parametrize("url", [
    "rediss://h:6379/0", "redis+sentinel://h:26379/mymaster", "redis+cluster://h:7000",
    "redis://app:pw@h:6379/0", "redis://:a;b@h:6379/0", "redis://h:6379/x",
])
def test_urls_ndb_redis_cannot_use_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as e:
        ndb_server(url)
    assert "pw@" not in str(e.value) and "a;b" not in str(e.value)


def test_ndb_bounds_keep_a_retried_call_within_store_timeout() -> None:
    t = ndb_timeouts(2000)
    assert (t.cmd_timeout, t.connect_timeout, t.allowed_timeouts, t.disable_time) == (
        1000, 1000, 0, 1)
    assert ndb_timeouts(1).cmd_timeout == 1


@pytest.mark.skipif(not Path(KAMAILIO).exists(), reason="kamailio is not installed")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.stem)
def test_kamailio_accepts_the_native_cfg(policy: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / GENERATED_NAME
    assert main(["--policy", str(policy), "--node", "check-1",
                 "--redis", "redis://:pw@127.0.0.1:1/0", "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o077 == 0  # it may hold a password
    defines = [line for line in capsys.readouterr().out.splitlines() if line]
    args = [KAMAILIO, "-c", "-f", str(ROOT / "deploy" / "kamailio" / "kamailio.cfg"),
            "-A", f'POLICER_PYTHON_SCRIPT="{ROOT}/deploy/kamailio/policer_kamailio_native.py"']
    for d in defines:
        args += ["-A", d]
    if "POLICER_WITH_EGRESS=1" in defines:  # and the example proxy's gateways
        (tmp_path / "gateways.list").write_text("1 sip:127.0.0.1:15061 0 1\n")
        args += ["-A", "WITH_GATEWAYS",
                 "-A", f'POLICER_DISPATCHER_LIST="{tmp_path / "gateways.list"}"']
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
