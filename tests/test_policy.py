"""Policies: the shipped files load and mean what their comments say; every
class of error in a bad file is reported with its exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from policer.classify import Classifier
from policer.policy import PolicyError, Reject, load_policy, parse_policy
from policer.store import Store
from tests.support import BAD_POLICIES, POLICIES, EngineFactory, call, policy_file

EXAMPLE = POLICIES / "example.yaml"


# ----------------------------------------------------------------------------- example.yaml


def test_every_shipped_policy_loads() -> None:
    files = sorted(POLICIES.glob("*.yaml"))
    assert {f.name for f in files} >= {"example.yaml", "china.yaml", "carrier.yaml"}
    for f in files:
        assert load_policy(f).namespace


def test_example_reads_what_its_comments_say() -> None:
    p = load_policy(EXAMPLE)
    assert p.namespace == "example"
    assert p.number_source == "ruri_user"
    assert dict(p.attributes) == {"account": "header:x-account"}
    assert p.header_names == ("x-account",)
    assert [c.name for c in p.classes] == ["emergency", "international", "domestic", "local"]
    assert {pr.name: pr.value for pr in p.profiles} == {
        "total": None, "emergency": None, "international": None, "domestic": None,
        "local": None, "user": "from_user", "account": "header:x-account",
    }
    total = p.limits["total"]
    assert (total.max, total.reserve_for_emergency) == (100, 10)
    intl = p.limits["international"]
    assert (intl.max, intl.reject.code, intl.reject.reason) == (20, 403, "International Limit")
    acct = p.limits["account"]
    assert (acct.max, acct.reject.code, acct.reject.reason) == (10, 486, "Account Call Limit")
    assert p.limits["user"].max == 3
    assert p.limits["user"].reject == p.reject
    # Retry-After is the default 503's; a limit with its own code does not inherit it
    assert intl.reject.retry_after is None and acct.reject.retry_after is None
    assert (p.reject.code, p.reject.reason, p.reject.retry_after) == (
        503, "Call Limit Reached", 30)
    assert p.emergency_class == "emergency" and p.emergency_bypass
    assert (p.timeouts.early_ms, p.timeouts.dialog_ms) == (120_000, 12 * 3_600_000)
    assert p.on_store_error == "admit"


@pytest.mark.parametrize(("number", "expected"), [
    ("112", "emergency"),
    ("110", "emergency"),
    ("911", "emergency"),
    ("1120", "local"),  # emergency numbers are exact, not prefixes
    ("11", "local"),
    ("0049301234567", "international"),
    ("00", "international"),
    ("+4930123456", "international"),
    ("0301234567", "domestic"),
    ("0", "domestic"),
    ("5551234", "local"),
    ("", "local"),
    ("alice", "local"),
])
def test_example_classifies_numbers(number: str, expected: str) -> None:
    c = Classifier(load_policy(EXAMPLE))
    assert c.number_class(number) == expected


def test_example_memberships() -> None:
    c = Classifier(load_policy(EXAMPLE))
    intl = c.classify(call("0049301234", "alice", headers={"X-Account": "acme"}))
    assert intl.number_class == "international" and not intl.emergency
    assert [m.label() for m in intl.members] == [
        "total", "international", "user=alice", "account=acme"]
    assert [m.max for m in intl.members] == [100, 20, 3, 10]
    assert intl.members[0].reserve == 10
    sos = c.classify(call("112", ""))
    assert sos.emergency and [m.label() for m in sos.members] == ["total", "emergency"]
    local = c.classify(call("5551234", "bob"))
    assert [m.label() for m in local.members] == ["total", "local", "user=bob"]


def test_example_ordinary_calls_stop_at_90_emergency_ones_go_on(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(policy_file(EXAMPLE))
    for i in range(90):
        assert e.admit(call("5551234", f"u{i}")).admitted
    d = e.admit(call("5551234", "late"))
    assert not d.admitted
    assert (d.code, d.reason, d.retry_after) == (503, "Call Limit Reached", 30)
    assert (d.limit, d.count, d.max) == ("total", 90, 90)
    # emergency calls use the reserve, then go over the limit, still counted
    for _ in range(10):
        d = e.admit(call("112", ""))
        assert d.admitted and not d.bypass and d.number_class == "emergency"
    d = e.admit(call("110", ""))
    assert d.admitted and d.bypass and (d.limit, d.count, d.max) == ("total", 100, 100)
    assert store.profile_size("total") == 101
    assert store.profile_size("emergency") == 11


def test_example_international_limit_answers_403(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(policy_file(EXAMPLE))
    for i in range(20):
        assert e.admit(call(f"00{i:04d}", f"u{i}")).admitted
    d = e.admit(call("+4930123", "x"))
    assert not d.admitted
    assert (d.code, d.reason, d.limit, d.count, d.max) == (403, "International Limit",
                                                           "international", 20, 20)
    assert e.admit(call("0301234", "y")).admitted  # domestic calls still go through
    assert store.profile_size("international") == 20


def test_example_account_limit_answers_486_per_account(
        engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(policy_file(EXAMPLE))
    acme = {"X-Account": "acme"}
    for i in range(10):
        assert e.admit(call("5551234", f"u{i}", headers=acme)).admitted
    d = e.admit(call("5551234", "other", headers=acme))
    assert not d.admitted
    assert (d.code, d.reason, d.limit, d.count, d.max) == (486, "Account Call Limit",
                                                           "account", 10, 10)
    assert e.admit(call("5551234", "z", headers={"X-Account": "beta"})).admitted
    assert e.admit(call("5551234", "w")).admitted  # no account: joins no account count
    assert store.profile_values("account") == {"acme": 10, "beta": 1}
    # a live limit raises one account's cap at run time
    store.limit_set("account", "acme", 11)
    assert e.admit(call("5551234", "v", headers=acme)).admitted


def test_example_user_may_place_three_calls(engine_for: EngineFactory) -> None:
    e = engine_for(policy_file(EXAMPLE))
    for _ in range(3):
        assert e.admit(call("5551234", "alice")).admitted
    d = e.admit(call("0301234", "alice"))
    assert not d.admitted
    assert (d.code, d.reason, d.retry_after) == (503, "Call Limit Reached", 30)
    assert (d.limit, d.count, d.max) == ("user", 3, 3)
    assert d.memberships == ("total", "domestic", "user=alice")
    assert e.admit(call("5551234", "bob")).admitted


# ----------------------------------------------------------------------------- china.yaml


@pytest.mark.parametrize(("number", "expected"), [
    ("110", "emergency"), ("119", "emergency"), ("120", "emergency"), ("122", "emergency"),
    ("112", "emergency"), ("114", "local"), ("1100", "local"),
    ("008613800138000", "international"), ("00", "international"),
    ("01012345678", "domestic"), ("02188886666", "domestic"),
    ("13800138000", "local"), ("88886666", "local"),
])
def test_china_classifies_by_chinese_numbering(number: str, expected: str) -> None:
    assert Classifier(load_policy(POLICIES / "china.yaml")).number_class(number) == expected


def test_china_decisions(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(policy_file(POLICIES / "china.yaml"))
    for i in range(30):
        assert e.admit(call(f"0086{i:08d}", f"u{i}")).admitted
    d = e.admit(call("00441234", "x"))
    assert (d.admitted, d.code, d.reason) == (False, 403, "International Limit")
    for _ in range(4):
        assert e.admit(call("13800138000", "zhang")).admitted
    d = e.admit(call("01012345678", "zhang"))
    assert (d.admitted, d.code, d.limit) == (False, 486, "user")
    d = e.admit(call("120", "zhang"))  # an ambulance is never refused
    assert d.admitted and d.bypass and d.number_class == "emergency"
    assert store.profile_size("emergency") == 1
    assert store.profile_size("total") == 35


# ----------------------------------------------------------------------------- carrier.yaml


def test_carrier_policy_reads_as_documented() -> None:
    p = load_policy(POLICIES / "carrier.yaml")
    assert dict(p.attributes) == {"account": "header:x-account", "trunk": "source_ip"}
    assert p.limits["account"].reject.code == 486
    assert p.limits["international"].reject.code == 403
    assert p.limits["account_international"].shadow
    assert p.on_store_error == "reject"
    assert p.store_timeout_ms == 100


def test_carrier_decisions(engine_for: EngineFactory, store: Store) -> None:
    e = engine_for(policy_file(POLICIES / "carrier.yaml"))
    acme = {"X-Account": "acme"}
    # per-user cap
    assert e.admit(call("5551234", "alice", headers=acme, source_ip="192.0.2.1")).admitted
    assert e.admit(call("5551234", "alice", headers=acme, source_ip="192.0.2.1")).admitted
    d = e.admit(call("5551234", "alice", headers=acme))
    assert (d.admitted, d.code, d.reason, d.limit) == (False, 486, "Busy Here", "user")
    # per-account international cap in shadow mode: admitted, reported
    for i in range(5):
        d = e.admit(call(f"+44{i}", f"intl{i}", headers=acme))
        assert d.admitted and not d.shadow
    d = e.admit(call("+445", "intl5", headers=acme))
    assert d.admitted and d.shadow and d.limit == "account_international"
    assert (d.count, d.max) == (5, 5)
    assert store.profile_size("account_international", "acme") == 6
    assert store.stats()["shadow_rejected"] == 1
    # premium numbers barred
    d = e.admit(call("09001234", "bob", headers=acme))
    assert (d.admitted, d.code, d.reason) == (False, 403, "Premium Numbers Barred")
    # per-account cap with a live override
    store.limit_set("account", "tiny", 1)
    tiny = {"X-Account": "tiny"}
    assert e.admit(call("5551234", "t1", headers=tiny)).admitted
    d = e.admit(call("5551234", "t2", headers=tiny))
    assert (d.admitted, d.code, d.reason, d.limit, d.max) == (
        False, 486, "Account Call Limit", "account", 1)
    assert store.profile_values("trunk") == {"192.0.2.1": 2}
    # emergency calls are admitted even from a full account
    assert e.admit(call("112", "t3", headers=tiny)).admitted


# ----------------------------------------------------------------------------- errors

ERRORS: dict[str, list[str]] = {
    "syntax.yaml": [
        "5:7: (syntax): expected ',' or '}', but got ':' "
        "(while parsing a flow mapping at line 4, column 10)",
    ],
    "unknown_key.yaml": [
        "6:20: limits.total.reserve_for_emergncy: unknown key "
        "(did you mean 'reserve_for_emergency'?)",
        "7:1: timeout: unknown key (did you mean 'timeouts'?)",
    ],
    "wrong_type.yaml": [
        "6:16: limits.total.max: expected an integer, got str 'ten'",
        "8:11: emergency.bypass: expected true or false, got str 'yes please'",
    ],
    "out_of_range.yaml": [
        "6:16: limits.total.max: must be between 0 and 10000000, got -1",
        "7:34: reject.retry_after: must be between 0 and 86400, got 100000",
    ],
    "duplicate_key.yaml": [
        "6:3: profiles.total: duplicate key",
        "8:18: limits.user.max: duplicate key",
    ],
    "unknown_class.yaml": [
        "7:24: profiles.intl.when.class: unknown class 'internatinal' "
        "(did you mean 'international'?)",
        "9:10: emergency.class: unknown class 'emergency'",
    ],
    "unknown_profile.yaml": [
        "7:9: limits.totl: unknown profile 'totl' (did you mean 'total'?)",
        "8:11: limits.acount: unknown profile 'acount' (did you mean 'account'?)",
    ],
    "value_source.yaml": [
        "7:17: profiles.user.value: unknown attribute 'from_usr' (did you mean 'from_user'?)",
        "8:19: profiles.tenant.value: unknown attribute 'tenant'; use one of account, "
        "from_user, from_domain, ruri_user, to_user, source_ip, auth_user, gateway, or "
        "header:<Name> (define others under call.attributes)",
        "9:18: profiles.empty.value: expected a string, got nothing",
        "10:18: profiles.trunk.value: not a SIP header name: 'X Trunk'",
    ],
    "reject_code.yaml": [
        "7:35: limits.total.reject.code: must be between 300 and 699, got 200",
        "8:42: limits.international.reject.code: must be between 300 and 699, got 700",
        "9:16: reject.code: must be between 300 and 699, got 299",
    ],
    "duration.yaml": [
        "4:10: timeouts.early: expected a duration such as 30s, 5m, 12h or 250ms, "
        "got str '2 minutes'",
        "5:11: timeouts.dialog: must be between 1s and 7d, got 30d",
        "6:16: store_timeout: must be between 1ms and 10s, got 0ms",
    ],
    "many.yaml": [
        "1:10: version: unsupported policy version '3'; this policer reads versions 1 and 2",
        "2:12: namespace: letters, digits, '_', '.', '-' only (1-64): 'bad namespace'",
        "4:11: call.number: must be one of ruri_user, to_user, got 'request_uri'",
        "9:17: profiles.user.value: unknown attribute 'frm_user' (did you mean 'from_user'?)",
        "11:43: limits.total.reserve_for_emergency: cannot exceed max (10)",
        "11:43: limits.total.reserve_for_emergency: needs an emergency class (emergency.class)",
        "12:10: limits.users: unknown profile 'users' (did you mean 'user'?)",
        "13:16: reject.code: must be between 300 and 699, got 100",
        "14:17: on_store_error: must be one of admit, reject, got 'ignore'",
        "15:19: timeouts.early: expected a duration such as 30s, 5m, 12h or 250ms, "
        "got str 'soon'",
    ],
}


def test_every_bad_fixture_is_checked() -> None:
    assert {f.name for f in BAD_POLICIES.glob("*.yaml")} == set(ERRORS)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_policy_errors(name: str) -> None:
    path = BAD_POLICIES / name
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    expected = [f"{path}:{line}" for line in ERRORS[name]]
    assert exc.value.errors == expected
    assert str(exc.value) == "\n".join(expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("", ["1:1: (document): the policy is empty"]),
    ("- 1\n- 2\n", ["1:1: (document): expected a mapping, got a list"]),
    ("profiles: {}\n", ["1:1: version: required key is missing",
                        "1:1: namespace: required key is missing"]),
    ("version: 1\nnamespace: x\nprofiles: [total]\n",
     ["3:11: profiles: expected a mapping, got a list"]),
    ("version: 1\nnamespace: x\nprofiles: {total: {}}\nlimits: {total: {shadow: true}}\n",
     ["4:17: limits.total.max: required key is missing"]),
    ("version: 1\nnamespace: x\nclasses:\n  a: {default: true}\n  b: {default: true}\n",
     ["5:16: classes.b.default: class 'a' is already the default"]),
    ("version: 1\nnamespace: x\nclasses:\n  a: {prefixes: ['0']}\n  b: {prefixes: ['0']}\n",
     ["5:17: classes.b.prefixes[0]: prefix '0' is already in class 'a'"]),
    ("version: 1\nnamespace: x\nclasses:\n  a: {}\n",
     ["4:6: classes.a: a class needs numbers, prefixes or default: true"]),
    ("version: 1\nnamespace: x\nfoo: 1\n", ["3:1: foo: unknown key"]),
    ("version: 1\nnamespace: x\nreject: {code: 486}\n", []),
    ("version: 1\nnamespace: x\nprofiles: {t: {}}\nreject: {retry_after: 9}\n"
     "limits: {t: {max: 1, reject: {reason: Full}}}\n", []),
])
def test_inline_errors(text: str, expected: list[str]) -> None:
    if not expected:
        p = parse_policy(text, "p.yaml")
        if "limits" in text:  # only the reason changes: code and Retry-After are inherited
            assert p.limits["t"].reject == Reject(503, "Full", 9)
        else:
            assert p.reject.reason == "Busy Here"
        return
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml")
    assert exc.value.errors == [f"p.yaml:{e}" for e in expected]


def test_unreadable_and_binary_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError) as exc:
        load_policy(missing)
    assert exc.value.errors == [f"{missing}:1:1: (file): cannot read: No such file or directory"]
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\nnamespace: \xff\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(binary)
    assert exc.value.errors == [f"{binary}:2:12: (file): not UTF-8 text (byte 0xff)"]


def test_numbers_are_read_as_written() -> None:
    p = parse_policy("version: 1\nnamespace: x\nclasses:\n  intl: {prefixes: [00, 0049]}\n"
                     "  sos: {numbers: [0110]}\n")
    assert p.classes[0].prefixes == ("00", "0049")
    assert p.classes[1].numbers == frozenset({"0110"})


def test_a_policy_is_immutable() -> None:
    p = load_policy(EXAMPLE)
    with pytest.raises(AttributeError):
        p.namespace = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.limits["total"] = p.limits["user"]  # type: ignore[index]


def test_v2_errors_name_the_place_and_suggest(tmp_path: Path) -> None:
    """Schedules, time zones and scheduled lists are checked like every other key."""
    path = tmp_path / "bad2.yaml"
    path.write_text(
        "version: 2\nnamespace: x\ntimezone: Europe/Berln\nschedules:\n"
        "  day: {hours: \"08:00-18:00\"}\n"
        "  morning: {days: [mon, tue], hours: \"09:00-11:00\"}\n"
        "  evening: {days: [mon], hours: \"17:00-20:00\"}\n"
        "  odd: {days: [mon, funday], hours: \"25:00-26:00\"}\n"
        "profiles:\n  total: {}\n"
        "limits:\n  total:\n"
        "    - {max: 10, schedule: day}\n"
        "    - {max: 5, schedule: morning}\n"
        "    - {max: 4, schedule: evening}\n"
        "    - {max: 3, rate: {max: 0, per: 1s}}\n"
        "    - {max: 1, schedule: nigth}\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors == [f"{path}:{e}" for e in (
        "3:11: timezone: unknown time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)",
        "8:21: schedules.odd.days[1]: must be one of mon, tue, wed, thu, fri, sat, sun, "
        "got 'funday'",
        "8:37: schedules.odd.hours: not a time of day in '25:00-26:00' (00:00 to 24:00)",
        "14:7: limits.total[1]: unreachable: schedule 'morning' is covered by the entries "
        "above",
        "15:7: limits.total[2]: schedule 'evening' overlaps an entry above (the first match "
        "wins): make the schedules disjoint",
        "16:28: limits.total[3].rate.max: must be between 1 and 1000000, got 0",
        "17:26: limits.total[4].schedule: unknown schedule 'nigth'",
    )]
