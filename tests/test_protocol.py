"""The tables of policer.protocol are the one description of every positional
structure (issue 17 item 1): the library's Lua, the generated Kamailio cfg and the
Python stores all read them. These tests hold the four to each other, with a real
Redis answering: a reply, a record or an op that one side writes, the other reads by
the table's names."""

from __future__ import annotations

import re
from typing import cast

import redis

from policer import protocol
from policer.adapters.kamailio_cfg import REPLY_VARS, generate, reply_var
from policer.call import Call
from policer.compile import compile_policy
from policer.policy import parse_policy
from policer.store import RedisStore
from policer.store.base import Op, pack_ops
from policer.store.keys import dialog_id
from policer.store.memory_store import unpack_ops
from tests.support.cli import ROOT

POLICY = """
version: 1
namespace: {ns}
call: {{number: ruri_user, attributes: {{account: "header:X-Account"}}}}
classes:
  domestic: {{prefixes: ["0"]}}
  local: {{default: true}}
profiles:
  total: {{}}
  domestic: {{when: {{class: domestic}}}}
  user: {{value: from_user}}
  account: {{value: account}}
limits:
  total: {{max: 10, max_duration: 90s}}
  user: {{max: 5}}
"""


def _store(redis_url: str, namespace: str) -> RedisStore:
    policy = parse_policy(POLICY.format(ns=namespace))
    store = RedisStore(redis_url, namespace, 2000)
    store.load(policy)
    return store


def _call(n: int) -> Call:
    return Call.from_raw(f"cid-{n}", "ft", from_user="alice", ruri_user="0301234",
                         headers={"X-Account": "acme"})


def _reply(store: RedisStore, mode: str, call: Call, table: protocol.Fields
           ) -> dict[str, object]:
    """The admit function's reply as the store's client reads it (strings decoded),
    named by the table it must have the fields of, in order."""
    raw: list[object] = store.client.fcall(
        store.library.function("admit"), 1, store.library.prefix,
        *store.call_arguments(call, "node-1", mode))
    assert len(raw) == len(table.fields)
    return dict(zip(table.fields, raw, strict=True))


def test_the_admit_reply_has_the_tables_fields_in_its_order(redis_url: str,
                                                            namespace: str) -> None:
    store = _store(redis_url, namespace)
    try:
        named = _reply(store, "a", _call(1), protocol.ADMIT_REPLY)
        assert named["admitted"] == 1 and named["code"] == 200
        assert named["dialog_id"] == dialog_id("cid-1", "ft")
        assert named["number_class"] == "domestic"
        assert set(str(named["memberships"]).split("\n")) == {
            "total", "domestic", "user=alice", "account=acme"}
        # the Python decoder reads the same reply by the same names
        result = store.admit_call(_call(2), "node-1")
        assert result.admitted and result.number_class == "domestic"
        assert result.dialog_id == dialog_id("cid-2", "ft")
        assert set(result.memberships) == {"total", "domestic", "user=alice", "account=acme"}
    finally:
        store.close()


def test_the_native_reply_is_what_the_generated_cfg_reads(redis_url: str,
                                                          namespace: str) -> None:
    """Mode A answers NATIVE_REPLY; route[POLICER_REPLY] of the generated cfg reads each
    field at the table's position into the $var the shipped policer.cfg uses."""
    store = _store(redis_url, namespace)
    try:
        named = _reply(store, "A", _call(3), protocol.NATIVE_REPLY)
        assert named["admitted"] == 1 and named["code"] == 200
        assert named["max_duration_s"] == 90
        assert named["dialog_id"] == dialog_id("cid-3", "ft")
    finally:
        store.close()
    policy = parse_policy(POLICY.format(ns=namespace))
    cfg = generate(policy, "node-1", redis_url).text
    reads = dict(re.findall(r"(\$var\(policer_\w+\)) = \$redis\(policer_admit=>value\[(\d+)\]\)",
                            cfg))
    fields = [f for group in REPLY_VARS.values() for f in group] + ["admitted"]
    assert {reply_var(f): str(protocol.NATIVE_REPLY.index(f)) for f in fields} == reads
    shipped = (ROOT / "deploy" / "kamailio" / "policer.cfg").read_text()
    for f in ("admitted", "dialog_id", "code", "reason", "max_duration_s"):
        assert reply_var(f) in shipped, f"policer.cfg does not read {f} ({reply_var(f)})"


def test_a_dialog_record_and_an_attempt_split_into_their_tables_fields(
        redis_url: str, namespace: str) -> None:
    store = _store(redis_url, namespace)
    c = redis.Redis.from_url(redis_url)
    try:
        store.admit_call(_call(4), "node-1")
        did = dialog_id("cid-4", "ft")
        raw = cast(bytes | None, c.get(f"{store.library.prefix}d:{did}"))
        assert raw is not None
        header, tail = raw.split(b"\n", 1)
        rec = dict(zip(protocol.DIALOG.fields, header.decode().split("|"), strict=True))
        assert rec["state"] == "early" and rec["class"] == "domestic"
        assert set(rec["members"].split(",")) == {"total", "domestic", "user:alice",
                                                  "account:acme"}
        assert b"cid-4" in tail
        info = store.dialog(did)
        assert info is not None and info.state == "early" and info.info["class"] == "domestic"
        (_, fields), = cast(list[tuple[bytes, dict[bytes, bytes]]],
                            c.xrange(f"{store.library.prefix}attempts"))
        attempt = dict(zip(protocol.ATTEMPT.fields, fields[b"a"].decode().split("|"),
                           strict=True))
        assert attempt["result"] == "a" and attempt["class"] == "domestic"
        assert attempt["code"] == "200" and fields[b"d"] == did.encode()
        (got,) = store.attempts()
        assert got.dialog_id == did and got.admitted
    finally:
        c.close()
        store.close()


def test_every_batch_op_packs_as_the_library_and_the_model_read_it() -> None:
    """Each BATCH_OPS letter: the library's OP_FIELDS (packed ops) or OP_LINE (line ops)
    names it with the table's field count, and what Python packs the model unpacks."""
    text = compile_policy(parse_policy(POLICY.format(ns="p"))).text
    counts = dict(re.findall(r"\['(\w)'\] = (\d+)", text.split("local OP_FIELDS = ", 1)[1]
                             .split("\n", 1)[0]))
    line = re.search(r"local OP_LINE = '\^\(\[([^\]]*)\]\)", text)
    assert line is not None
    for op in protocol.BATCH_OPS:
        if op.line:
            assert op.letter in line.group(1).replace("%", "")
        else:
            assert counts[op.letter] == str(len(op.fields)), op.letter
    ops = [Op("confirm", "cid;ft", 0), Op("refresh", "cid;ft", 5000),
           Op("release", "cid;ft", "bye"), Op("set_var", "cid;ft", "k", "v w"),
           Op("release", "odd id\n;ft", "bye"), Op("void", "cid;ft", 1234)]
    assert unpack_ops(pack_ops(ops, ())) == ops
