"""``policer serve`` against hostile clients (issue 21): what a client can make the
decision service hold or wait for before it has shown a token, and the answers it
gets. A real ``policer serve`` process on a free loopback port and a real Redis;
the hostile bytes go over raw sockets. No figure here is a timing: the bounds are
bytes, connections and answers (the timing figures are in docs/security.md, measured
by ``benchmarks/serve.py``)."""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
from pathlib import Path

import pytest

from lab.redis_server import RedisServer
from tests.support import wait_for
from tests.support.cli import policy_copy, run_cli
from tests.support.relay import HoldingRelay
from tests.support.serve import Serve, body, read_answers, rss_kib

MAX_HEAD = 16 * 1024


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def open_header_line(port: int, total: int) -> tuple[bool, bytes]:
    """A request whose one header line never ends: up to ``total`` bytes of it, sent
    while the server reads them. Whether the server stopped it (an answer, a close or
    a reset before all was sent) and what it answered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nX-Long: ")
        chunk = b"a" * 65536
        sent = 0
        try:
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return True, b""
        s.settimeout(5)
        try:
            answer = until_closed(s)
        except TimeoutError:
            return False, b""
        return True, answer
    finally:
        s.close()


# ----------------------------------------------------------------------------- head


def test_a_head_is_counted_as_it_arrives_and_cut_at_max_head(serve: Serve) -> None:
    """One header line with no end: 431 once the head passes MAX_HEAD, then the
    connection ends; before, httptools kept every piece of the line (until the idle
    sweep, ~80 s later), so four 32 MB lines grew the service by 160 MB."""
    with socket.create_connection(("127.0.0.1", serve.port), timeout=30) as s:
        s.sendall(b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * MAX_HEAD)
        answer = until_closed(s)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in answer and b"16384" in answer
    # a head just under the bound is read and answered
    with socket.create_connection(("127.0.0.1", serve.port), timeout=30) as s:
        head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: "
        s.sendall(head + b"p" * (MAX_HEAD - len(head) - 4) + b"\r\n\r\n")
        (status, _), = read_answers(s, 1)
        assert status == 200
    before = rss_kib(serve.proc.pid)
    for _ in range(4):  # four lines of 32 MB each, one after the other
        stopped, answer = open_header_line(serve.port, 32 * 1024 * 1024)
        assert stopped, "the server read a 32 MB header line without answering"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
    grown = rss_kib(serve.proc.pid) - before
    assert grown < 8 * 1024, f"policer serve grew by {grown} KiB"
    assert serve.request("GET", "/v1/health")[0] == 200


def test_a_slow_head_or_body_is_cut_at_the_head_deadline(tmp_path: Path,
                                                         env: dict[str, str]) -> None:
    """Slow loris: a client that trickles its request a few bytes at a time (never
    idle, never over MAX_HEAD) gets 408 and the connection ends once the request is
    not whole --head-timeout seconds after its first byte; so does one that trickles
    its body."""
    s = Serve(tmp_path, env, "--head-timeout", "1")
    try:
        for start, drip in (
                (b"POST /v1/admit HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n"),
                (b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n",
                 b'{"a": 1,')):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
                c.sendall(start)
                c.settimeout(0.2)
                answer = b""
                for _ in range(100):  # 20 s at most; the deadline is 1 s
                    try:
                        c.sendall(drip)
                        chunk = c.recv(65536)
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    answer += chunk
                    if not chunk:
                        break
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b"connection: close" in answer
        assert s.request("GET", "/v1/health")[0] == 200
    finally:
        s.stop()


def test_connections_over_the_cap_are_refused_at_once(tmp_path: Path,
                                                      env: dict[str, str]) -> None:
    """--max-connections: a connection over the cap gets 503 and is closed at once (not
    queued); one more fits when one of the others ends."""
    s = Serve(tmp_path, env, "--max-connections", "4")
    held: list[socket.socket] = []
    try:
        for _ in range(4):  # each mid-way through a head: held open by the server
            c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            c.sendall(b"GET /v1/health HTTP/1.1\r\n")
            held.append(c)
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
            answer = until_closed(c)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"too many connections" in answer and b"connection: close" in answer
        # the held ones are still served
        held[0].sendall(b"Host: x\r\n\r\n")
        (status, _), = read_answers(held[0], 1)
        assert status == 200
        held.pop().close()
        for _ in range(200):  # the server sees the close soon after
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
                c.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if until_closed(c).startswith(b"HTTP/1.1 200 "):
                    break
        else:
            raise AssertionError("no room after a connection ended")
        # the refusals are logged (counted, once a sweep: no line per refused connection)
        assert wait_for(lambda: "connections_refused" in s.log.read_text(), 10)
    finally:
        for c in held:
            c.close()
        s.stop()


def test_an_idle_connection_is_closed(tmp_path: Path, env: dict[str, str]) -> None:
    s = Serve(tmp_path, env, "--idle-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
            c.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            (status, _), = read_answers(c, 1)
            assert status == 200
            assert until_closed(c) == b""  # then nothing more: the server closes it
    finally:
        s.stop()


@pytest.mark.parametrize("args", [["--max-connections", "0"], ["--head-timeout", "0"],
                                  ["--idle-timeout", "-1"], ["--head-timeout", "nan"]])
def test_bounds_out_of_range_are_usage_errors(args: list[str], env: dict[str, str]) -> None:
    proc = run_cli("serve", *args, env=env, timeout=30)
    assert proc.returncode == 2, (args, proc.stderr)
    assert args[0] in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- small HTTP


def raw(port: int, request: bytes) -> tuple[int, bytes, bool]:
    """One raw request: the status and body of its answer, and (an error) whether the
    server closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        (status, payload), = read_answers(s, 1)
        closed = False
        if status >= 400:
            s.settimeout(5)
            try:
                closed = s.recv(1) == b""
            except TimeoutError:
                closed = False
            except ConnectionResetError:
                closed = True
    return status, payload, closed


ADMIT = json.dumps(body("small-1")).encode()


def post(length: bytes, payload: bytes = ADMIT) -> bytes:
    return (b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Length: " + length +
            b"\r\n\r\n" + payload)


def test_content_length_with_trailing_garbage_is_400(serve: Serve) -> None:
    n = b"%d" % len(ADMIT)
    for bad in (n + b"abc", n + b" abc", n + b";", n + b"," + n, b"+" + n, b"0x" + n):
        status, payload, closed = raw(serve.port, post(bad))
        assert (status, closed) == (400, True), bad
        assert b"Content-Length" in payload
    # white space around the number is no garbage (RFC 9110: OWS around a field value)
    for good in (n + b" ", n + b"\t", b" " + n):
        status, payload, _ = raw(serve.port, post(good))
        assert status == 200, (good, payload)


def test_the_bearer_scheme_is_case_insensitive_the_token_is_not(tmp_path: Path,
                                                                env: dict[str, str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-Token\n")
    s = Serve(tmp_path, env, "--token-file", str(token_file))
    try:
        for auth in ("Bearer s3cr3t-Token", "bearer s3cr3t-Token", "BEARER s3cr3t-Token",
                     "bEaReR s3cr3t-Token", "Bearer  s3cr3t-Token"):
            assert s.request("GET", "/v1/health", headers={"Authorization": auth})[0] == 200, \
                auth
        for auth in ("bearer s3cr3t-token", "Bearer S3CR3T-TOKEN", "Bearers3cr3t-Token",
                     "Basic s3cr3t-Token", "s3cr3t-Token", "Bearer s3cr3t-Token x",
                     "Bearer", "bearer "):
            assert s.request("GET", "/v1/health", headers={"Authorization": auth})[0] == 401, \
                auth
    finally:
        s.stop()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"chunked, gzip", b"deflate",
                                    b"identity", b"chunked, chunked", b"x-custom,chunked"])
def test_a_transfer_coding_other_than_chunked_alone_is_501(serve: Serve,
                                                           coding: bytes) -> None:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ADMIT), ADMIT)
    request = (b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding +
               b"\r\n\r\n" + chunked)
    status, payload, closed = raw(serve.port, request)
    assert (status, closed) == (501, True), payload
    assert b"Transfer-Encoding" in payload
    # chunked alone, in any case, is read
    ok = request.replace(b"Transfer-Encoding: " + coding, b"Transfer-Encoding: Chunked")
    assert raw(serve.port, ok)[0] == 200


def test_100_continue_only_after_the_token_is_checked(tmp_path: Path,
                                                      env: dict[str, str]) -> None:
    """An unauthorized request that waits for 100 Continue gets 401 and the connection
    ends: it never learns it could send its body."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t\n")
    s = Serve(tmp_path, env, "--token-file", str(token_file))
    expect = (b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: %d\r\n" % len(ADMIT))
    try:
        for auth in (b"", b"Authorization: Bearer wrong\r\n"):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
                c.sendall(expect + auth + b"\r\n")
                answer = until_closed(c)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
            assert b"100 Continue" not in answer and b"connection: close" in answer
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
            c.sendall(expect + b"Authorization: bearer s3cr3t\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            c.sendall(ADMIT)
            (status, payload), = read_answers(c, 1)
            assert status == 200 and json.loads(payload)["dialog_id"] == "small-1;ft"
    finally:
        s.stop()


@pytest.mark.parametrize(("path", "payload"), [
    ("/v1/admit", {"call_id": "", "from_tag": "t"}),
    ("/v1/explain", {"call_id": "", "from_tag": "t"}),
    ("/v1/release", {"call_id": "", "from_tag": "t"}),
    ("/v1/confirm", {"call_id": "", "from_tag": ""}),
])
def test_an_empty_call_id_is_400(serve: Serve, path: str, payload: dict[str, str]) -> None:
    status, out = serve.post(path, payload)
    assert status == 400 and "'call_id' must not be empty" in out["error"]


@pytest.mark.parametrize("payload", [
    b'{"call_id": "n1", "from_tag": "t", "x": NaN}',
    b'{"call_id": "n2", "from_tag": "t", "x": Infinity}',
    b'{"call_id": "n3", "from_tag": "t", "x": -Infinity}',
    b'{"call_id": "n4", "from_tag": "t", "x": [1e999]}',
    b'\xef\xbb\xbf{"call_id": "n5", "from_tag": "t"}',
    '{"call_id": "n6", "from_tag": "t"}'.encode("utf-16-le"),
    '{"call_id": "n7", "from_tag": "t"}'.encode("utf-16"),
])
def test_json_that_is_not_plain_utf8_json_is_400(serve: Serve, payload: bytes) -> None:
    """NaN, Infinity (also a number too large for a double), a UTF-8 byte order mark
    and UTF-16 text are not JSON a client may send (RFC 8259): 400, nothing decided."""
    for path in ("/v1/admit", "/v1/explain"):
        status, out = serve.post(path, payload)
        assert status == 400, (path, payload, out)
        assert "malformed JSON" in out["error"]
    assert serve.post("/v1/release", {"call_id": "n1", "from_tag": "t"})[1]["ok"] is False


# ----------------------------------------------------------------------------- store stall


def _ready(s: socket.socket) -> bool:
    """Whether the server has sent anything on ``s`` yet (without waiting)."""
    return bool(select.select([s], [], [], 0)[0])


def test_a_frozen_store_holds_up_no_other_request(tmp_path: Path, namespace: str) -> None:
    """Redis frozen (SIGSTOP), store_timeout 1 s: a request that waits for the store
    (explain, health, a dialog event) holds up no other connection's request, and once
    the circuit is open an admit is decided by the fallback at once, while a request
    still waits for the store. Before, those store calls ran inside the worker's event
    loop: every other connection waited behind them, one after another, and answers
    came long after store_timeout. (How late is a timing: benchmarks/serve.py
    --freeze measures it, docs/security.md has the figure.)"""
    policy = policy_copy(tmp_path, namespace)
    policy.write_text(policy.read_text() + "store_timeout: 1s\n")
    with RedisServer() as private:
        s = Serve(tmp_path, {"POLICER_REDIS_URL": private.url, "POLICER_POLICY": str(policy)})
        try:
            assert s.post("/v1/admit", body("warm"))[1]["fallback"] is False
            private.signal(signal.SIGSTOP)
            try:
                _while_frozen(s.port)
            finally:
                private.signal(signal.SIGCONT)
            # the store answers again: decisions come from it again
            assert wait_for(lambda: s.post("/v1/admit", body("fr-10", "u10"))[1][
                "fallback"] is False, 15)
            # and the calls the fallback admitted are recorded (then: a duplicate)
            assert wait_for(lambda: s.post("/v1/admit", body("fr-9", number="112"))[1][
                "duplicate"] is True, 10)
        finally:
            s.stop()


def _request(port: int, path: bytes, payload: bytes) -> socket.socket:
    """A connection with one request sent on it (POST with a payload, else GET)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    method = b"POST" if payload else b"GET"
    c.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        method, path, len(payload), payload))
    return c


def _while_frozen(port: int) -> None:
    blockers = {
        "explain": (b"/v1/explain", json.dumps(body("x-1")).encode(), 503),
        "health": (b"/v1/health", b"", 503),
        "release": (b"/v1/release", b'{"dialog_id": "z-1;ft"}', 202),
    }

    def request(path: bytes, payload: bytes) -> socket.socket:
        return _request(port, path, payload)

    for name, (path, payload, status) in blockers.items():
        with request(path, payload) as a, request(b"/v1/nothing", b"") as b:
            (got, _), = read_answers(b, 1)
            assert got == 404
            assert not _ready(a), f"{name}: answered before a request it waits for"
            (got, out), = read_answers(a, 1)
            assert got == status, (name, out)
    # three admits in flight when the store does not answer: each gets the fallback
    # decision once late, and the circuit opens
    admits = [request(b"/v1/admit", json.dumps(body(f"fr-{i}", f"u{i}")).encode())
              for i in range(3)]
    for c in admits:
        (got, out), = read_answers(c, 1)
        assert got == 200 and json.loads(out)["fallback"] is True
        c.close()
    explain, _, _ = blockers["explain"]
    with request(explain, blockers["explain"][1]) as a, \
            request(b"/v1/admit", json.dumps(body("fr-9", number="112")).encode()) as b:
        (got, out), = read_answers(b, 1)
        decision = json.loads(out)
        assert got == 200 and decision["fallback"] is True
        assert decision["admitted"] is True  # an emergency call, whatever the policy
        assert "circuit open" in decision["error"]
        assert not _ready(a), "the admit waited behind a request for the store"
        assert read_answers(a, 1)[0][0] == 503
    # a dialog event is queued at once, in order, while the circuit is open: it waits
    # neither for a probe of the store nor behind another request's store call
    with request(explain, blockers["explain"][1]) as a, \
            request(b"/v1/release", b'{"dialog_id": "fr-0;ft"}') as b:
        (got, out), = read_answers(b, 1)
        assert got == 202 and json.loads(out)["queued"] is True
        assert not _ready(a), "the release waited behind a request for the store"
        assert read_answers(a, 1)[0][0] == 503


def test_an_admit_is_answered_while_an_explain_waits_for_the_store(tmp_path: Path,
                                                                   namespace: str) -> None:
    """Issue 17: explain, health and dialog events wait for the store in the worker's
    store thread, never in its event loop. A relay between policer serve and Redis
    holds what the explain's connection sends (a paused store connection), a health
    check and a release wait behind it in the store thread; meanwhile an admit goes
    out on the admits' own connection, is decided by the store and answered. Then the
    relay lets the explain through, and the three are answered by the store."""
    policy = policy_copy(tmp_path, namespace, replace={
        "on_store_error: admit": "on_store_error: admit\nstore_timeout: 10s"})
    with RedisServer() as private, HoldingRelay(private.port) as relay:
        s = Serve(tmp_path, {"POLICER_REDIS_URL": relay.url, "POLICER_POLICY": str(policy)})
        try:
            # both connections open: the admits' and the store thread's
            assert s.post("/v1/admit", body("warm"))[1]["fallback"] is False
            assert s.post("/v1/explain", body("warm-x"))[0] == 200
            relay.hold(b"explain-held-by-the-relay")
            explain = json.dumps(body("explain-held-by-the-relay")).encode()
            with _request(s.port, b"/v1/explain", explain) as a:
                assert relay.held.wait(20), "the explain did not reach the relay"
                with _request(s.port, b"/v1/health", b"") as h, \
                        _request(s.port, b"/v1/release", b'{"dialog_id": "warm;ft"}') as r, \
                        _request(s.port, b"/v1/admit", json.dumps(body("during")).encode()) as b:
                    (got, out), = read_answers(b, 1)
                    decision = json.loads(out)
                    assert got == 200 and decision["fallback"] is False, decision
                    assert decision["admitted"] is True
                    for name, c in (("explain", a), ("health", h), ("release", r)):
                        assert not _ready(c), f"{name} answered while the store was held"
                    relay.release()
                    (got, out), = read_answers(a, 1)
                    assert got == 200 and json.loads(out)["decision"]["admitted"] is True
                    assert read_answers(h, 1)[0][0] == 200
                    (got, out), = read_answers(r, 1)
                    assert got == 200 and json.loads(out)["ok"] is True
        finally:
            s.stop()
