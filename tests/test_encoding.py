"""One encoding of untrusted SIP values into keys, in the decision function (Lua),
and its Python twin that reads keys back (``policer.call.key_part``): the same keys
for every value, never a brace, separator, white space or newline in an encoded
value, and no value reaching another value's key.

The function is fed exactly what a proxy sends: the raw bytes of Call-ID, From-tag and
the attributes, and its own answer (dialog id, memberships) is compared with the
Python encoding of the same values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policer.call import Call
from policer.store import RedisStore
from policer.store.keys import dialog_id, key_part, value_from_key
from tests.support import STORE_TIMEOUT_MS, new_namespace, policy_text

POLICY = """
version: 1
namespace: enc
call:
  number: ruri_user
  attributes:
    account: header:X-Account
classes:
  local: {default: true}
profiles:
  total: {}
  user: {value: from_user}
  account: {value: account}
limits:
  total: {max: 1000000}
"""

SAFE = re.compile(r"^[A-Za-z0-9_.@%~-]*$")

values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.sampled_from(["{", "}", ":", " ", "\r\n", "\x00", "%", "~", "@", "a@b", "%7E", ";",
                     "\ud800", "é", "\U0001F600"]),
    # long enough to end in a digest (more than 200 encoded characters)
    st.sampled_from(["a", "{", "é", "@"]).map(lambda u: u * 300),
    st.binary(min_size=70, max_size=90).map(lambda b: b * 4),
)


@pytest.fixture(scope="module")
def enc_store(redis_url: str) -> Iterator[RedisStore]:
    ns = new_namespace()
    policy = policy_text(POLICY, ns)
    s = RedisStore(redis_url, ns, timeout_ms=STORE_TIMEOUT_MS, policy=policy)
    s.load(policy)
    yield s
    s.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call_id=values, from_tag=values, user=values, account=values)
def test_the_function_encodes_every_value_as_python_does(
        enc_store: RedisStore, call_id: str | bytes, from_tag: str | bytes,
        user: str | bytes, account: str | bytes) -> None:
    call = Call.from_raw(call_id, from_tag, from_user=user, ruri_user="5551234",
                         headers={"X-Account": account})
    r = enc_store.explain_call(call)
    # the dialog id the function built from the raw Call-ID and From-tag
    assert r.dialog_id == dialog_id(call.call_id, call.from_tag)
    cid, _, tag = r.dialog_id.partition(";")
    for part in (cid, tag):
        assert SAFE.match(part), part
    expected = ["total"]
    for profile, value in (("user", call.from_user), ("account", call.headers.get("x-account"))):
        if value:
            enc = key_part(value)
            assert SAFE.match(enc) and len(enc) <= 200 + 41
            expected.append(f"{profile}={value_from_key(enc)}")
    assert list(r.memberships) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=values)
def test_an_admitted_value_counts_under_its_python_key_and_no_other(
        redis_url: str, user: str | bytes) -> None:
    ns = new_namespace()
    policy = policy_text(POLICY, ns)
    s = RedisStore(redis_url, ns, timeout_ms=STORE_TIMEOUT_MS, policy=policy)
    try:
        call = Call.from_raw("c@h", "t", from_user=user, ruri_user="5551234")
        assert s.admit_call(call, "n1").admitted
        fields = {str(f) for f in s.client.hkeys(s.keys.counts)} - {
            "#confirmed", "!hold", "#layout", "#hashtable"}
        want = {s.keys.count_field("total")}
        if call.from_user:
            want.add(s.keys.count_field("user", call.from_user))
            assert s.profile_size("user", call.from_user) == 1
            assert s.profile_values("user") == {value_from_key(key_part(call.from_user)): 1}
        assert fields == want
        for f in fields:  # no separator of the library's own strings, no white space
            assert not set(f) & set(",|{} \r\n\x00\t")
        keys = list(s.client.scan_iter(match=f"policer:{{{ns}}}:*", count=1000))
        for k in keys:
            assert k.count("{") == 1 and k.count("}") == 1
    finally:
        s.close()
