"""A policy of hundreds of thousands of prefixes: its library compiles in chunks that a
real Redis 7.0 loads (one table constructor of them all is a "constant table
overflow" in Lua 5.1), and classifies in Redis exactly as the Python classifier does."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import redis

import policer.compile as compile_module
from policer.classify import Classifier
from policer.compile import compile_policy
from policer.policy import NumberClass, Policy, Profile
from policer.store import RedisStore
from tests.support import STORE_TIMEOUT_MS, call

#: more than Lua 5.1's 2^18 constants in one function
BIG = 300_000


def big_policy(namespace: str, prefixes: int = BIG, numbers: int = 0) -> Policy:
    rnd = random.Random(21)
    premium: set[str] = set()
    while len(premium) < prefixes:
        premium.add(f"0{rnd.randrange(10**6, 10**10)}")
    ported = {f"+49{10**9 + i * 7919}" for i in range(numbers)}
    return Policy(namespace=namespace, classes=(
        NumberClass("emergency", numbers=frozenset({"112", "110"})),
        NumberClass("premium", prefixes=tuple(sorted(premium))),
        NumberClass("ported", numbers=frozenset(ported), prefixes=("+49",)),
        NumberClass("other", default=True),
    ), profiles=(Profile("total"),), emergency_class="emergency")


def samples(policy: Policy, n: int = 300) -> list[str]:
    """Numbers of every kind: each class's entries, longer numbers under its prefixes,
    numbers no prefix matches."""
    rnd = random.Random(5)
    out = ["112", "110", "1120", "0", "", "+49", "+4"]
    for c in policy.classes:
        for p in rnd.sample(c.prefixes, min(n, len(c.prefixes))):
            out += [p, p + "7", p[:-1]]
        out += rnd.sample(sorted(c.numbers), min(n, len(c.numbers)))
    return out


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=60, decode_responses=True)
    yield c
    c.close()


def test_a_library_of_300000_prefixes_loads_and_classifies_as_python_does(
        redis_url: str, namespace: str) -> None:
    policy = big_policy(namespace, numbers=60_000)
    library = compile_policy(policy)
    # premium's prefixes in 6 chunks, +49 in one; the numbers: 112 and 110, the 60,000
    assert library.text.count("local function fill(t)") == 6 + 1 + 1 + 2
    store = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS, policy=policy)
    try:
        assert store.load(policy) == library.policy_hash
        classifier = Classifier(policy)
        for number in samples(policy):
            got = store.explain_call(call(number)).number_class
            assert got == classifier.number_class(number), number
    finally:
        store.close()


def test_one_constructor_of_them_all_would_not_load(client: redis.Redis,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the tables are chunked: Redis refuses the same library written whole."""
    policy = big_policy("whole")
    monkeypatch.setattr(compile_module, "TABLE_CHUNK", 10**9)
    text = compile_module._compile(policy, "whole").text
    with pytest.raises(redis.ResponseError, match="constant table overflow"):
        client.execute_command("FUNCTION", "LOAD", "REPLACE", text)


def test_chunks_keep_every_entry_and_escape_odd_keys(client: redis.Redis, redis_url: str,
                                                     namespace: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks, and keys that are not their own Lua literal (a policy built in
    code, not read from a file), still give the table the Python classifier uses."""
    monkeypatch.setattr(compile_module, "TABLE_CHUNK", 7)
    odd = ('a"b', "c\\d", "é", "\n")
    policy = Policy(namespace=namespace, classes=(
        NumberClass("x", numbers=frozenset({f"9{i}" for i in range(20)} | {'q"'}),
                    prefixes=tuple(f"8{i}" for i in range(30)) + odd),
        NumberClass("y", prefixes=("7", "80")),  # '80' again: the later class's
    ))
    text = compile_module._compile(policy, namespace).text
    assert text.count("local function fill(t)") == 3 + 5 + 1
    client.execute_command("FUNCTION", "LOAD", "REPLACE", text)
    classifier = Classifier(policy)
    store = RedisStore(redis_url, namespace, timeout_ms=STORE_TIMEOUT_MS, policy=policy)
    try:
        for number in [*(f"8{i}5" for i in range(30)), *odd, *(o + "1" for o in odd), "805",
                       "7", "q", 'q"', "91", "999"]:
            assert store.explain_call(call(number)).number_class == \
                classifier.number_class(number), number
    finally:
        store.close()


def test_a_policy_is_compiled_once() -> None:
    policy = big_policy("once", prefixes=1000)
    assert compile_policy(policy) is compile_policy(policy)
    assert compile_policy(policy, "other") is not compile_policy(policy)
    assert compile_policy(policy, "other") is compile_policy(policy, "other")
