"""Values from SIP are untrusted: empty, 64 KiB long, not UTF-8, full of hash-tag
braces, separators, white space, CR/LF and NUL. None of them may raise, change
a decision, reach another value's key or leave the namespace.

The Redis side runs in a database of its own (db 9 of the session server), so
that every key in it can be checked after each example.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policer.call import MAX_VALUE, Call, text
from policer.engine import Engine
from policer.store import MemoryStore, RedisStore
from policer.store.keys import dialog_id, key_part
from tests.support import STORE_TIMEOUT_MS, new_namespace, policy_text

POLICY = """
version: 1
namespace: fuzz
call:
  number: ruri_user
  attributes:
    account: header:X-Account
classes:
  emergency: {numbers: ["112"]}
  international: {prefixes: ["00", "+"]}
  local: {default: true}
profiles:
  total: {}
  international: {when: {class: international}}
  user: {value: from_user}
  domain: {value: from_domain}
  account: {value: account}
  to: {value: to_user}
  ip: {value: source_ip}
  auth: {value: auth_user}
limits:
  total: {max: 1000000}
  user: {max: 1000}
  account: {max: 1000}
"""
#: valued profile -> the Call attribute it reads
VALUED = {"user": "from_user", "domain": "from_domain", "account": "header:x-account",
          "to": "to_user", "ip": "source_ip", "auth": "auth_user"}

SPECIAL = [
    "", " ", "{", "}", "{}", "}{", "{fuzz}", "{other}", ":", "::", "a:b", "\r\n", "\n", "\x00",
    "a\x00b", "%", "%7B", "%7E", "~", "a~b", ";", "*", "?", "[a]", "\\", "p:total",
    "policer:{other}:p:user:x", "}:p:user:{x", "\t\x0b\x0c", "\u2028", "ü", "\U0001F600",
    "\ud800", "\udfff", "\udcff",
]
SPECIAL_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"{\xff}", b"\x00\xff:",
                 b"\xc3\xbc"]
HUGE = 65_536


def _huge_str(unit: str) -> str:
    return unit * (HUGE // len(unit))


def _huge_bytes(unit: bytes) -> bytes:
    return unit * (HUGE // len(unit))


raw_values = st.one_of(
    st.sampled_from(SPECIAL),
    st.sampled_from(SPECIAL_BYTES),
    st.text(alphabet=st.sampled_from(list("{}: \r\n\x00%~;ab")), max_size=24),
    st.text(max_size=24),
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Zs"]), max_size=8),
    st.binary(max_size=24),
    st.sampled_from(["{", "}:", "a", "\r\n", "\x00 ", "é", "\ud800"]).map(_huge_str),
    st.sampled_from([b"\xff", b"{\xfe}", b"a"]).map(_huge_bytes),
    st.tuples(st.sampled_from(["a", "{"]), st.integers(0, 300)).map(lambda t: t[0] * t[1]),
    st.none(),
)


@st.composite
def sip_calls(draw: st.DrawFn) -> dict[str, object]:
    return {
        "call_id": draw(raw_values),
        "from_tag": draw(raw_values),
        "from_user": draw(raw_values),
        "from_domain": draw(raw_values),
        "ruri_user": draw(st.one_of(raw_values, st.sampled_from(["112", "0049301", "+1"]))),
        "to_user": draw(raw_values),
        "source_ip": draw(raw_values),
        "auth_user": draw(raw_values),
        "headers": {draw(st.sampled_from(["X-Account", "x-account", "X-ACCOUNT"])):
                    draw(raw_values),
                    draw(raw_values) or "x-other": draw(raw_values)},
    }


def _shown(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _build(raw: dict[str, object]) -> Call:
    fields = dict(raw)
    call_id, from_tag = fields.pop("call_id"), fields.pop("from_tag")
    return Call.from_raw(call_id, from_tag, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fuzz_db(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@SETTINGS
@given(raw=sip_calls())
def test_from_raw_never_raises_and_bounds_values(raw: dict[str, object]) -> None:
    call = _build(raw)
    for name in ("call_id", "from_tag", "from_user", "from_domain", "ruri_user", "to_user",
                 "source_ip", "auth_user"):
        value = getattr(call, name)
        assert isinstance(value, str) and len(value) <= MAX_VALUE
        value.encode("utf-8", "surrogateescape")  # every value can be encoded
    did = dialog_id(call.call_id, call.from_tag)
    assert did.count(";") == 1
    assert not set(did) & set("{}: \r\n\x00")
    assert len(did) <= 2 * 200 + 1


@SETTINGS
@given(raws=st.lists(sip_calls(), min_size=1, max_size=5))
def test_untrusted_values_stay_in_their_own_keys(fuzz_db: str,
                                                 raws: list[dict[str, object]]) -> None:
    client = redis.Redis.from_url(fuzz_db)
    client.flushdb()
    ns = new_namespace()
    store = RedisStore(fuzz_db, ns, timeout_ms=STORE_TIMEOUT_MS)
    memory = MemoryStore(ns)
    engine = Engine(policy_text(POLICY, ns), store, node="fuzz")
    model = Engine(policy_text(POLICY, ns), memory, node="fuzz")
    try:
        dialogs: dict[str, Call] = {}
        for raw in raws:
            call = _build(raw)
            d = engine.admit(call)
            assert d == model.admit(call)
            assert not d.fallback and d.error == ""
            assert d.admitted and d.code == 200 and d.reason == "OK"
            did = dialog_id(call.call_id, call.from_tag)
            assert d.duplicate == (did in dialogs)
            dialogs.setdefault(did, call)
            assert engine.set_var(did, text(raw["from_user"]), call.to_user)
            # kept as valid UTF-8: bytes that are not UTF-8 become U+FFFD
            assert engine.get_var(did, text(raw["from_user"])) == _shown(call.to_user)

        # every key of this policy, and only such keys, with one hash tag: the namespace
        prefix = f"policer:{{{ns}}}:".encode()
        keys = list(client.scan_iter(count=1000))
        assert keys
        for k in keys:
            assert k.startswith(prefix), k
            assert k.count(b"{") == 1 and k.count(b"}") == 1, k
            assert not set(k) & set(b" \r\n\x00\t"), k

        # one key per distinct value, counting exactly that value's dialogs
        assert store.profile_size("total") == len(dialogs)
        for profile, source in VALUED.items():
            per_value: dict[str, int] = defaultdict(int)
            for call in dialogs.values():
                v = call.attribute(source)
                if v:
                    per_value[v] += 1
            fields = client.hkeys(prefix + b"c")
            value_fields = [f for f in fields if f.startswith(f"{profile}:".encode())]  # type: ignore[arg-type]
            assert len(value_fields) == len(per_value), profile
            assert len({key_part(v) for v in per_value}) == len(per_value)
            for v, n in per_value.items():
                assert store.profile_size(profile, v) == n
                assert memory.profile_size(profile, v) == n

        for did, call in dialogs.items():
            assert engine.confirm(did)
            rec = engine.release(did, "bye")
            # kept as sent: bytes that are not UTF-8 as surrogate escapes (shown escaped)
            assert rec is not None and rec.call_id == call.call_id
            assert memory.confirm(did, 1000) and memory.release(did, "bye") is not None
        assert store.profile_size("total") == 0
        assert store.stats()["active"] == 0
        assert all(store.profile_values(p) == {} for p in VALUED)
    finally:
        store.close()
        client.close()


def test_a_short_value_cannot_spell_a_long_values_key() -> None:
    long = "x" * 300
    assert len(key_part(long)) < 300
    assert key_part(key_part(long)) != key_part(long)
    assert key_part("~") == "%7E"


def test_values_differing_only_after_the_prefix_get_distinct_keys() -> None:
    a, b = "{" * 1000 + "a", "{" * 1000 + "b"
    assert key_part(a) != key_part(b)
    assert dialog_id(a, "t") != dialog_id(b, "t")


def test_lone_surrogates_and_their_bytes_do_not_raise(engine_for, store) -> None:  # type: ignore[no-untyped-def]
    e = engine_for(POLICY)
    for v in ("\ud800", "a\udfffb", b"\xed\xa0\x80"):
        c = Call.from_raw(v, v, from_user=v, ruri_user=v, headers={"X-Account": v})
        d = e.admit(c)
        assert not d.fallback
        if d.duplicate:  # "\ud800" and its bytes are one dialog id: it ended already
            assert not d.admitted and d.kind == "ended"
        else:
            assert d.admitted and e.release(d.dialog_id) is not None


def test_profile_values_keeps_non_utf8_values_apart(store) -> None:  # type: ignore[no-untyped-def]
    from policer.store import AdmitRequest, Member

    for i, raw in enumerate((b"\xff", b"\xfe")):
        v = text(raw)
        assert store.admit(AdmitRequest(f"d{i}", (Member("user", v),), 10_000)).admitted
    assert len(store.profile_values("user")) == 2


def test_engine_never_raises_on_a_directly_built_call(redis_store: RedisStore) -> None:
    e = Engine(policy_text(POLICY, redis_store.namespace), redis_store, node="n")
    d = e.admit(Call("c1", "t", from_user="\ud800", ruri_user="5551234"))
    assert d.admitted
    assert e.set_var(d.dialog_id, "x", "\ud800") in (True, False)
