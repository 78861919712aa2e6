"""``policer serve`` as its clients see it: a real ``policer serve`` process on a free
loopback port, a real Redis, HTTP from the standard library's client and raw sockets."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from lab.redis_server import RedisServer, free_port
from tests.support.cli import cli_json, policy_copy, run_cli
from tests.support.serve import Serve, body, read_answers


def cli_admit(env: dict[str, str], call_id: str, from_user: str = "alice",
              number: str = "0301234567", *args: str) -> dict[str, Any]:
    out: dict[str, Any] = cli_json(
        "admit", "--call-id", call_id, "--from-tag", "ft", "--from", from_user,
        "--from-domain", "example.net", "--to", number, "--source-ip", "192.0.2.7", *args,
        env=env)
    return out


def size(env: dict[str, str], profile: str, value: str | None = None) -> int:
    proc = run_cli("profile", "size", profile, *([value] if value else []), env=env,
                   check=True)
    return int(proc.stdout)


# ----------------------------------------------------------------------------- decisions


def test_admit_answers_what_policer_admit_json_prints(serve: Serve,
                                                      env: dict[str, str]) -> None:
    headers = {"X-Account": "acme"}
    by_cli = cli_admit(env, "cli-1", "alice", "0301234567", "--header", "X-Account: acme")
    status, by_http = serve.post("/v1/admit", body("http-1", headers=headers))
    assert status == 200
    assert by_cli["dialog_id"] == "cli-1;ft" and by_http["dialog_id"] == "http-1;ft"
    assert list(by_http) == list(by_cli)  # the same keys, in the same order
    assert {**by_http, "dialog_id": ""} == {**by_cli, "dialog_id": ""}
    assert by_http["admitted"] is True and by_http["class"] == "domestic"
    assert by_http["memberships"] == ["total", "domestic", "user=alice", "account=acme"]

    # a rejection too: alice's limit is 3 (two held now, one more, then rejected)
    assert serve.post("/v1/admit", body("http-2"))[1]["admitted"] is True
    by_cli = cli_admit(env, "cli-3")
    status, by_http = serve.post("/v1/admit", body("http-3"))
    assert status == 200
    assert by_http["admitted"] is False
    assert {**by_http, "dialog_id": ""} == {**by_cli, "dialog_id": ""}
    assert (by_http["code"], by_http["reason"], by_http["retry_after"], by_http["limit"],
            by_http["count"], by_http["max"]) == (503, "Call Limit Reached", 30, "user", 3, 3)


def test_limits_hold_and_events_bring_counts_back_to_zero(serve: Serve,
                                                          env: dict[str, str]) -> None:
    conn = serve.connection()  # one keep-alive connection for all of it
    answers = [serve.post("/v1/admit", body(f"c{i}"), conn=conn)[1] for i in range(5)]
    assert [a["admitted"] for a in answers] == [True, True, True, False, False]
    assert size(env, "user", "alice") == 3
    # an emergency call is admitted over the limit and counted
    status, sos = serve.post("/v1/admit", body("sos", number="112"), conn=conn)
    assert status == 200 and sos["admitted"] is True and sos["bypass"] is True
    assert size(env, "total") == 4

    admitted = [a["dialog_id"] for a in answers if a["admitted"]] + [sos["dialog_id"]]
    for did in admitted:
        status, out = serve.post("/v1/confirm", {"dialog_id": did}, conn=conn)
        assert (status, out) == (200, {"dialog_id": did, "ok": True, "queued": False})
    status, out = serve.post("/v1/refresh", {"dialog_id": admitted[0], "timeout": 600},
                             conn=conn)
    assert (status, out["ok"]) == (200, True)
    for did in admitted:
        status, out = serve.post("/v1/release", {"dialog_id": did, "reason": "bye"},
                                 conn=conn)
        assert status == 200 and out["ok"] is True and out["queued"] is False
        assert out["record"]["Reason"] == "bye" and out["record"]["DialogID"] == did
    assert size(env, "total") == 0 and size(env, "user", "alice") == 0
    stats = cli_json("stats", env=env)
    assert stats["active"] == 0 and stats["rejected"] == 2
    # events of a rejected call, or of no call at all, find no live dialog
    status, out = serve.post("/v1/release", {"dialog_id": answers[3]["dialog_id"]},
                             conn=conn)
    assert (status, out["ok"], out["record"]) == (200, False, None)
    assert serve.post("/v1/confirm", {"dialog_id": "nobody;x"}, conn=conn)[1]["ok"] is False
    # a proxy that kept no dialog id names the call by its raw Call-ID and From-tag
    did = serve.post("/v1/admit", body("raw id@host"), conn=conn)[1]["dialog_id"]
    status, out = serve.post("/v1/release", {"call_id": "raw id@host", "from_tag": "ft"},
                             conn=conn)
    assert (status, out["dialog_id"], out["ok"]) == (200, did, True)
    conn.close()


def test_every_call_may_be_retried(serve: Serve, env: dict[str, str]) -> None:
    first = serve.post("/v1/admit", body("r1"))[1]
    again = serve.post("/v1/admit", body("r1"))[1]
    assert again["duplicate"] is True
    assert {**again, "duplicate": False} == first
    assert size(env, "total") == 1
    did = first["dialog_id"]
    assert serve.post("/v1/confirm", {"dialog_id": did})[1]["ok"] is True
    assert serve.post("/v1/confirm", {"dialog_id": did})[1]["ok"] is True  # still live
    assert serve.post("/v1/release", {"dialog_id": did})[1]["ok"] is True
    status, out = serve.post("/v1/release", {"dialog_id": did})
    assert (status, out["ok"]) == (200, False)  # released once, counted once
    assert size(env, "total") == 0
    cdr = run_cli("cdr", "tail", "-n", "0", "--json", env=env, check=True).stdout
    assert [json.loads(line)["DialogID"] for line in cdr.splitlines()] == [did]


def test_explain_answers_what_policer_explain_json_prints(serve: Serve,
                                                          env: dict[str, str]) -> None:
    serve.post("/v1/admit", body("e1", number="00441632960123"))
    by_cli = cli_json("explain", "--call-id", "x", "--from-tag", "ft", "--from", "alice",
                      "--from-domain", "example.net", "--to", "00441632960123",
                      "--source-ip", "192.0.2.7", env=env)
    status, by_http = serve.post("/v1/explain", body("x", number="00441632960123"))
    assert status == 200
    assert by_http == by_cli
    assert by_http["class"] == "international"
    assert {v["profile"]: v["count"] for v in by_http["limits"]}["international"] == 1
    assert size(env, "total") == 1  # explain counted nothing


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("payload", "message"), [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "malformed JSON"),
    (json.dumps({"from_tag": "t"}).encode(), "'call_id' is required"),
    (json.dumps({"call_id": "c"}).encode(), "'from_tag' is required"),
    (json.dumps({"call_id": 7, "from_tag": "t"}).encode(), "'call_id' must be a string"),
    (json.dumps({"call_id": "c", "from_tag": "t", "from_user": ["x"]}).encode(),
     "'from_user' must be a string"),
    (json.dumps({"call_id": "c", "from_tag": "t", "headers": "X-A: b"}).encode(), "'headers'"),
    (json.dumps({"call_id": "c", "from_tag": "t", "headers": {"X-A": 1}}).encode(),
     "headers['X-A']"),
])
def test_malformed_admits_get_400_with_the_reason(serve: Serve, payload: bytes,
                                                  message: str) -> None:
    status, out = serve.post("/v1/admit", payload)
    assert status == 400
    assert message in out["error"]


@pytest.mark.parametrize(("path", "payload", "message"), [
    ("/v1/confirm", {}, "'dialog_id' is required"),
    ("/v1/confirm", {"dialog_id": 5}, "must be a string"),
    ("/v1/release", {"dialog_id": "a}:{b;c"}, "not a dialog id"),
    ("/v1/release", {"dialog_id": "a b;c"}, "not a dialog id"),
    ("/v1/release", {"dialog_id": "x" * 500 + ";t"}, "not a dialog id"),
    ("/v1/release", {"dialog_id": "a;b", "reason": "whatever"}, "'reason' must be one of"),
    ("/v1/refresh", {"dialog_id": "a;b", "timeout": -1}, "'timeout'"),
    ("/v1/refresh", {"dialog_id": "a;b", "timeout": True}, "'timeout'"),
])
def test_malformed_events_get_400(serve: Serve, path: str, payload: dict[str, Any],
                                  message: str) -> None:
    status, out = serve.post(path, payload)
    assert status == 400
    assert message in out["error"]


def test_sizes_paths_and_methods(serve: Serve) -> None:
    big = json.dumps(body("big", from_user="x" * 70_000)).encode()
    status, out = serve.post("/v1/admit", big)
    assert status == 413 and "65536" in out["error"]
    assert serve.request("GET", "/v1/nothing")[0] == 404
    assert serve.post("/", {})[0] == 404
    assert serve.request("GET", "/v1/admit")[0] == 405
    assert serve.request("PUT", "/v1/release", {"dialog_id": "a;b"})[0] == 405
    assert serve.post("/v1/health", {})[0] == 405
    # a body just under the bound is read (curl sends such with Expect: 100-continue)
    status, out = serve.post("/v1/admit", body("near", from_user="y" * 60_000))
    assert status == 200 and out["admitted"] is True


def test_odd_and_huge_values_never_break_a_decision(serve: Serve, env: dict[str, str]) -> None:
    odd = [
        ("\ud800", "\udcff", "lone surrogates"),
        ("{a}:b%41\r\n\x00", "t", "braces, separators, CR LF, NUL"),
        ("c" * 10_000, "t" * 10_000, "long"),
        ("empty-tag", "", "an empty From-tag (an empty Call-ID is 400)"),
    ]
    for call_id, tag, _ in odd:
        payload = json.dumps({"call_id": call_id, "from_tag": tag, "from_user": call_id,
                              "headers": {"X-Account": call_id, call_id: call_id}})
        status, out = serve.post("/v1/admit", payload.encode())
        assert status == 200, payload[:80]
        assert out["fallback"] is False and out["admitted"] is True
        assert serve.post("/v1/release", {"dialog_id": out["dialog_id"]})[1]["ok"] is True
    assert size(env, "total") == 0


def test_raw_http_keep_alive_pipelining_chunked_and_100_continue(serve: Serve) -> None:
    with socket.create_connection(("127.0.0.1", serve.port), timeout=20) as s:
        b1 = json.dumps(body("p1")).encode()
        chunked = json.dumps(body("p2")).encode()
        s.sendall(
            b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b1), b1)
            + b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked), chunked))
        answers = read_answers(s, 3)
        assert [a[0] for a in answers] == [200, 200, 200]
        assert json.loads(answers[0][1])["dialog_id"] == "p1;ft"
        assert json.loads(answers[1][1])["status"] == "ok"
        assert json.loads(answers[2][1])["dialog_id"] == "p2;ft"
        # Expect: 100-continue: the server says go on before the body is sent
        b3 = json.dumps(body("p3")).encode()
        s.sendall(b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(b3))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b3)
        (status, payload), = read_answers(s, 1)
        assert status == 200 and json.loads(payload)["dialog_id"] == "p3;ft"
        # garbage: 400, and the connection ends
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        (status, payload), = read_answers(s, 1)
        assert status == 400 and "malformed HTTP" in json.loads(payload)["error"]
        assert s.recv(100) == b""
    # HTTP/1.0 without keep-alive: one answer, then the server closes
    with socket.create_connection(("127.0.0.1", serve.port), timeout=20) as s:
        s.sendall(b"GET /v1/health HTTP/1.0\r\n\r\n")
        (status, _), = read_answers(s, 1)
        assert status == 200
        assert s.recv(100) == b""


# ----------------------------------------------------------------------------- token


def test_a_token_is_required_when_configured(tmp_path: Path, env: dict[str, str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-token\n")
    s = Serve(tmp_path, env, "--token-file", str(token_file))
    try:
        assert s.post("/v1/admit", body("t1"))[0] == 401
        assert s.request("GET", "/v1/health")[0] == 401
        assert s.request("GET", "/v1/nothing")[0] == 401  # nothing told without it
        wrong = {"Authorization": "Bearer s3cr3t-tokeN"}
        assert s.post("/v1/admit", body("t1"), headers=wrong)[0] == 401
        assert s.post("/v1/admit", body("t1"),
                      headers={"Authorization": "s3cr3t-token"})[0] == 401
        right = {"Authorization": "Bearer s3cr3t-token"}
        status, out = s.post("/v1/admit", body("t1"), headers=right)
        assert status == 200 and out["admitted"] is True
        assert s.request("GET", "/v1/health", headers=right)[0] == 200
    finally:
        s.stop()


@pytest.mark.parametrize("listen", ["0.0.0.0:9", "[::]:9", "192.0.2.1:9", "example.org:9"])
def test_refuses_to_listen_beyond_loopback_without_a_token(listen: str,
                                                           env: dict[str, str]) -> None:
    proc = run_cli("serve", "--listen", listen, env=env, timeout=30)
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr and "--token-file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_insecure_allows_a_wildcard_listener(tmp_path: Path, env: dict[str, str]) -> None:
    s = Serve(tmp_path, env, "--insecure", host="0.0.0.0")
    try:
        assert s.request("GET", "/v1/health")[0] == 200
    finally:
        s.stop()


def test_bad_token_files_and_listen_addresses_are_usage_errors(tmp_path: Path,
                                                               env: dict[str, str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args in (["--token-file", str(empty)], ["--token-file", str(tmp_path / "none")],
                 ["--listen", "nowhere"], ["--workers", "0"]):
        proc = run_cli("serve", *args, env=env, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- Redis down


def test_health_and_fallback_follow_the_store(tmp_path: Path, namespace: str) -> None:
    with RedisServer() as private:
        env = {"POLICER_REDIS_URL": private.url,
               "POLICER_POLICY": str(policy_copy(tmp_path, namespace))}
        s = Serve(tmp_path, env)
        try:
            status, out = s.request("GET", "/v1/health")
            assert status == 200 and out["status"] == "ok" and out["policy_hash"]
            assert s.post("/v1/admit", body("h1"))[1]["fallback"] is False
            private.kill()
            status, out = s.request("GET", "/v1/health")
            assert status == 503 and out["status"] == "unavailable"
            assert "store error" in out["error"]
            # the policy's on_store_error (example: admit), emergency calls always
            for cid, number in (("h2", "0301234567"), ("h3", "112")):
                status, out = s.post("/v1/admit", body(cid, number=number))
                assert status == 200
                assert out["fallback"] is True and out["admitted"] is True
                assert out["dialog_id"] == f"{cid};ft" and out["error"]
            # dialog events wait in the worker's queue: 202, queued
            status, out = s.post("/v1/release", {"dialog_id": "h1;ft"})
            assert (status, out["queued"], out["ok"]) == (202, True, False)
            # explain is an operator's question: it says the store did not answer
            status, out = s.post("/v1/explain", body("h4"))
            assert status == 503 and "store error" in out["error"]
        finally:
            s.stop()


def test_admits_in_flight_survive_a_lost_library_and_a_stalled_store(tmp_path: Path,
                                                                     namespace: str) -> None:
    """The worker's own pipelined connection: an error reply (Redis lost the library)
    is decided again through the engine, which loads it; a reply later than the
    policy's store timeout (50 ms) gets the fallback decision at once; then decisions
    come from the store again."""
    import redis

    with RedisServer() as private:
        env = {"POLICER_REDIS_URL": private.url,
               "POLICER_POLICY": str(policy_copy(tmp_path, namespace))}
        s = Serve(tmp_path, env)
        r = redis.Redis.from_url(private.url)
        try:
            for i in range(3):
                out = s.post("/v1/admit", body(f"f{i}", from_user=f"u{i}"))[1]
                assert out["fallback"] is False
            r.function_flush()
            status, out = s.post("/v1/admit", body("f3", from_user="u3"))
            assert status == 200 and out["fallback"] is False and out["admitted"] is True
            assert r.function_list()  # loaded again
            r.execute_command("CLIENT", "PAUSE", 600, "ALL")
            t0 = time.monotonic()
            status, out = s.post("/v1/admit", body("f4", from_user="u4"))
            assert status == 200 and out["fallback"] is True and out["admitted"] is True
            assert time.monotonic() - t0 < 0.5 and "imeout" in out["error"]
            time.sleep(0.7)
            deadline = time.monotonic() + 10
            i = 5
            while True:
                out = s.post("/v1/admit", body(f"f{i}", from_user=f"u{i}"))[1]
                if out["fallback"] is False or time.monotonic() > deadline:
                    break
                i += 1
                time.sleep(0.2)
            assert out["fallback"] is False and out["duplicate"] is False
            # the call admitted by the fallback is recorded by the next tick (1 s)
            deadline = time.monotonic() + 5
            while not s.post("/v1/admit", body("f4", from_user="u4"))[1]["duplicate"]:
                assert time.monotonic() < deadline, "the fallback's call was not recorded"
                time.sleep(0.2)
        finally:
            s.stop()


def test_on_store_error_reject_answers_the_policy_rejection(tmp_path: Path,
                                                            namespace: str) -> None:
    policy = policy_copy(tmp_path, namespace,
                         replace={"on_store_error: admit": "on_store_error: reject"})
    env = {"POLICER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "POLICER_POLICY": str(policy)}
    s = Serve(tmp_path, env)  # its Redis never answers
    try:
        status, out = s.post("/v1/admit", body("x1"))
        assert status == 200 and out["fallback"] is True and out["admitted"] is False
        assert (out["code"], out["reason"], out["retry_after"]) == (
            503, "Call Limit Reached", 30)
        assert s.post("/v1/admit", body("x2", number="911"))[1]["admitted"] is True
        assert s.request("GET", "/v1/health")[0] == 503
    finally:
        s.stop()


# ----------------------------------------------------------------------------- workers


def test_two_workers_share_the_port_and_metrics(tmp_path: Path, env: dict[str, str]) -> None:
    s = Serve(tmp_path, env, "--workers", "2")
    try:
        conns = [s.connection() for _ in range(6)]  # spread over both workers
        for i, c in enumerate(conns):
            out = s.post("/v1/admit", body(f"w{i}", from_user=f"user{i}"), conn=c)[1]
            assert out["admitted"] is True
        assert size(env, "total") == 6
        status, text = s.request("GET", "/metrics")
        assert status == 200
        metrics = text.decode()
        for family in ("policer_store_up 1.0", "policer_profile_dialogs",
                       "policer_decision_seconds_count", "policer_policy_info"):
            assert family in metrics
        count = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("policer_decision_seconds_count"))
        assert count == 6  # every worker's decisions, whichever worker answered
        for c in conns:
            c.close()
        pids = _children(s.proc.pid)
        assert len(pids) == 2
    finally:
        s.stop()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out
