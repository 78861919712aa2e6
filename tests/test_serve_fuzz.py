"""A bounded fuzz of ``policer serve``'s HTTP request reader (issue 21): random bytes,
and well-formed requests mutated (bytes inserted, dropped, replaced, repeated, cut;
odd header values; one huge header line), sent in random pieces to a real ``policer
serve`` process (a real Redis behind it), then the client's end is closed.

The property: every input gets well-formed HTTP answers (a status line, headers, a
Content-Length body; JSON whose ``error`` says what was wrong), or a close, or both:
never a traceback, never a 500, never an error in the service's log; and the service's
memory stays bounded. A thousand examples, a few seconds."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import new_namespace
from tests.support.cli import policy_copy
from tests.support.serve import Serve, body, rss_kib

ADMIT = json.dumps(body("fz-1")).encode()
#: Well-formed requests the mutations start from.
SEEDS = [
    b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(ADMIT), ADMIT),
    b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"%x\r\n%s\r\n0\r\n\r\n" % (len(ADMIT), ADMIT),
    b"POST /v1/admit HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(ADMIT), ADMIT),
    b'POST /v1/release HTTP/1.1\r\nHost: x\r\nContent-Length: 23\r\n\r\n{"dialog_id": "fz-1;ft"}',
    b"GET /v1/health HTTP/1.0\r\n\r\n",
    b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",
    b'POST /v1/explain HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}',
]
#: Header lines worth trying anywhere in a head.
ODD_HEADERS = [
    b"Content-Length: 99999999999999999999999", b"Content-Length: -1",
    b"Content-Length: 5, 5", b"Content-Length: 1e3", b"Content-Length: 70000",
    b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Expect: 200-ok",
    b"Authorization: Bearer x", b"Authorization: bearer", b"Connection: close",
    b"Connection: keep-alive", b"Connection: upgrade\r\nUpgrade: websocket",
    b"X-Folded: a\r\n b", b"X-Nul: a\x00b", b"X-Bin: \xff\xfe", b": empty name",
    b"X-Long: " + b"a" * 20_000, b"Host: x\r\nHost: y",
]
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]+\r\n")
#: Statuses the service gives a client; 500 would be a bug.
ANSWERS = {100, 200, 202, 400, 401, 404, 405, 408, 413, 431, 501, 503}


BODIES = [ADMIT, b"", b'{"dialog_id": "a;b"}', b'{"call_id": "", "from_tag": "t"}',
          b'{"call_id": "c", "from_tag": "t", "x": NaN}', b"\xef\xbb\xbf{}", b"[1]",
          b'{"call_id": "\\ud800", "from_tag": "t"}', b"{" * 2000, b"\xff" * 8]


@st.composite
def built(draw: st.DrawFn) -> bytes:
    """A request from parts: method, target, version, odd header lines, a body."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"get",
                                   b"PRI", b"CONNECT"]))
    target = draw(st.sampled_from([b"/v1/admit", b"/v1/health", b"/metrics", b"/v1/release",
                                   b"/v1/explain", b"/v1/refresh", b"*", b"/v1/admit?x=1",
                                   b"http://h/v1/admit", b"/%00", b"/" + b"u" * 17_000]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    lines = draw(st.lists(st.one_of(st.sampled_from(ODD_HEADERS),
                                    st.binary(max_size=40).map(lambda b: b"X-R: " + b)),
                          max_size=4))
    payload = draw(st.sampled_from(BODIES))
    if draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(payload))
    return (method + b" " + target + b" " + version + b"\r\n" +
            b"".join(line + b"\r\n" for line in lines) + b"\r\n" + payload)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A well-formed or built request, with bytes inserted, dropped, replaced,
    repeated, cut, odd header lines and line ends added."""
    data = bytearray(draw(st.one_of(st.sampled_from(SEEDS), built())))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat", "cut",
                                   "header", "crlf"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "repeat":
            data[at:at] = bytes(data[at:at + draw(st.integers(1, 64))]) * draw(
                st.integers(2, 50))
        elif op == "cut":
            del data[at:]
        elif op == "header":
            line = data.find(b"\r\n")
            if line >= 0:
                data[line + 2:line + 2] = draw(st.sampled_from(ODD_HEADERS)) + b"\r\n"
        else:
            data[at:at] = draw(st.sampled_from([b"\r\n", b"\r", b"\n", b"\r\n\r\n"]))
    return bytes(data)


requests = st.one_of(built(), mutated(), st.binary(max_size=512),
                     st.lists(st.one_of(st.sampled_from(SEEDS), built()), min_size=1,
                              max_size=4).map(b"".join))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {"POLICER_REDIS_URL": redis_url,
           "POLICER_POLICY": str(policy_copy(tmp, new_namespace()))}
    s = Serve(tmp, env)
    try:
        yield s
    finally:
        s.stop()


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send ``data`` in pieces (cut at ``cuts``), close the sending side, and read
    until the server closes (a reset is a close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        out = b""
        try:
            last = 0
            for at in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
                if at > last:
                    s.sendall(data[last:at])
                    last = at
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (it answered and ended the connection)
            pass
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    return out


def check_answers(out: bytes) -> None:
    """``out`` is a run of whole HTTP answers (the last one may be cut by a reset)."""
    while out:
        m = _STATUS.match(out)
        assert m, f"not an HTTP answer: {out[:200]!r}"
        status = int(m.group(1))
        assert status in ANSWERS, out[:300]
        end = out.find(b"\r\n\r\n")
        if end < 0:
            return  # cut by a reset
        head = out[:end].lower()
        out = out[end + 4:]
        if status == 100:
            continue
        length = re.search(rb"\r\ncontent-length: (\d+)", head)
        assert length, head
        payload = out[:int(length.group(1))]
        out = out[int(length.group(1)):]
        assert b"Traceback" not in payload
        if b"content-type: application/json" in head and payload and \
                len(payload) == int(length.group(1)):  # (an answer to HEAD has no body)
            answer = json.loads(payload)
            if status >= 400:
                assert answer["error"] and "Traceback" not in answer["error"]


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=requests, cuts=st.lists(st.integers(0, 1 << 16), max_size=4))
def test_every_input_gets_answers_or_a_close(served: Serve, data: bytes,
                                            cuts: list[int]) -> None:
    check_answers(exchange(served.port, data, cuts))


def test_after_the_fuzz_no_error_and_memory_bounded(served: Serve) -> None:
    """After the examples above (same process): nothing went wrong inside the
    service, and it holds no more memory than a few MB over what it started with
    (reading a bounded request twice over)."""
    before = rss_kib(served.proc.pid)
    big = SEEDS[0].replace(b"Host: x", b"X-Long: " + b"a" * 15_000, 1)
    for i in range(200):  # the same bounded request, many times, some cut short
        check_answers(exchange(served.port, big[:len(big) - (i % 3) * 500], [i * 97]))
    grown = rss_kib(served.proc.pid) - before
    assert grown < 8 * 1024, f"policer serve grew by {grown} KiB"
    log = served.log.read_text()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if '"level": "error"' in line]
    assert not errors, errors[:3]
