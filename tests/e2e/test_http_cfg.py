"""The http flavour's generated cfg (``policer.adapters.kamailio_http``) without
running Kamailio's SIP side: what it sends and how it falls back, and that Kamailio
accepts the whole configuration (``kamailio -c``) for every policy here. Not marked
e2e (no proxy runs; the check needs the binary)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from policer.adapters.kamailio_http import GENERATED_NAME, generate, main
from policer.policy import load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
POLICIES = sorted([*(ROOT / "tests" / "e2e" / "policies").glob("*.yaml"),
                   ROOT / "policies" / "example.yaml"])
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
HTTP_CLIENT = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/http_client.so")


def test_headers_number_and_fallback_come_from_the_policy() -> None:
    text = generate(load_policy(ROOT / "policies" / "example.yaml"), "http://127.0.0.1:9478")
    assert '"policer=>http://127.0.0.1:9478"' in text
    assert 'jansson_set("string", "headers.x-account", "$hdr(x-account)"' in text
    assert "$var(policer_number) = $rU;" in text
    emergency = text[text.index("route[POLICER_HTTP_EMERGENCY]"):]
    emergency = emergency[:emergency.index("\n}")]
    for number in ("110", "112", "119", "120", "911"):
        assert f'$var(policer_number) == "{number}"' in emergency
    # international "00" and "+", domestic "0": longest prefix first, none emergency
    assert emergency.index('== "00"') < emergency.index('== "0")')
    on_error = text[text.index("route[POLICER_HTTP_ON_ERROR]"):]
    assert "$var(policer_admit_on_error) = 1;" in on_error  # on_store_error: admit
    assert '$var(policer_reason) = "Call Limit Reached";' in on_error
    assert "$var(policer_retry_after) = 30;" in on_error


def test_an_emergency_default_class_and_to_user_numbers() -> None:
    policy = parse_policy("""
version: 1
namespace: h
call: {number: to_user}
classes: {sos: {default: true}, other: {prefixes: ["9"]}}
emergency: {class: sos}
profiles: {total: {}}
on_store_error: reject
""")
    text = generate(policy, "http://[::1]:9478")
    assert "$var(policer_number) = $tU;" in text
    assert "$var(policer_admit_on_error) = 0;" in text
    emergency = text[text.index("route[POLICER_HTTP_EMERGENCY]"):]
    emergency = emergency[:emergency.index("\n}") + 2]
    assert emergency.endswith("\t$var(policer_emergency) = 1;\n}")
    with pytest.raises(ValueError):
        generate(policy, 'http://x"y')


@pytest.mark.skipif(not Path(KAMAILIO).exists() or not HTTP_CLIENT.exists(),
                    reason="kamailio or its http_client module is not installed")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.stem)
def test_kamailio_accepts_the_http_cfg(policy: Path, tmp_path: Path) -> None:
    out = tmp_path / GENERATED_NAME
    assert main(["--policy", str(policy), "--serve", "http://127.0.0.1:9478",
                 "--out", str(out)]) == 0
    args = [KAMAILIO, "-c", "-f", str(ROOT / "deploy" / "kamailio" / "kamailio.cfg"),
            "-A", "WITH_HTTP"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
