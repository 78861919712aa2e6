#!/usr/bin/env python3
"""Benchmark of ``policer serve``: ``POST /v1/admit`` over loopback keep-alive against
the in-process engine, with the same policy, the same Redis and the same calls.

    .venv/bin/python benchmarks/serve.py                  # the figures of docs/benchmarks.md
    .venv/bin/python benchmarks/serve.py --stacks httptools,uvicorn,threaded --wrk --repeats 5
                                                          # HTTP servers, interleaved
    .venv/bin/python benchmarks/serve.py --freeze 2 --connections 32 --repeats 5  # store stall
    .venv/bin/python benchmarks/serve.py --hostile 1000 --workers 1  # memory, hostile clients

What it runs (everything on 127.0.0.1, a private ``redis-server`` unless ``--redis``):

- the policy: ``--policy`` (default ``policies/example.yaml``) with every limit's max
  raised to 10^7 and a namespace of its own, so every INVITE is admitted: the same
  profiles, keys and checks for every call, and no count saturates during a run;
- the calls: dialled numbers of the local, domestic and international classes, 96
  callers, 12 accounts (one call in five without), a fresh Call-ID for every request;
- **latency**: one closed-loop client, in turn (0.5 s slices, ABBA) calling
  ``Engine.admit(Call.from_raw(...))`` in its own process and ``POST /v1/admit`` on
  one keep-alive connection to a server with one worker: p50, p99 of each and the
  difference of the p50s;
- **throughput**: ``--workers`` in-process engine processes, each in a closed loop, then
  the server with ``--workers`` workers and ``--connections`` closed-loop client
  connections (``--clients`` processes; a Python client sends a prepared request and
  reads the answer with two system calls), decisions/s of each and their ratio.

- **freeze** (``--freeze SECONDS``, instead of the above): ``--connections``
  closed-loop connections (``--clients`` processes, one selector each) send admits to
  ``policer serve --workers N``; after 1 s the private redis-server is frozen
  (SIGSTOP) for SECONDS, then thawed: p50, p99 and max answer time of the requests
  sent while it was frozen, and the share the fallback decided (the policy's
  ``store_timeout`` bounds them; a fresh redis-server per run, medians of
  ``--repeats``). ``--serve-root DIR`` runs policer serve from another checkout
  (before/after).
- **hostile** (``--hostile N``, instead): policer serve's resident memory (its
  process and workers) with N connections open that each send ``--hostile-kind``:
  ``header`` (a header line without an end, 15 KiB: under MAX_HEAD, held),
  ``loris`` (a partial head, one more line a second), ``idle``, ``long`` (256 KiB
  of a header line: stopped at MAX_HEAD); how many the server closed, and whether a
  new request is answered meanwhile.

- **stacks** (``--stacks``): the same figures for each HTTP server, interleaved (run
  r measures every stack in turn, the order turned by one each run; medians of
  ``--repeats``): ``httptools`` is ``policer serve`` (its own HTTP/1.1 server on
  httptools' parser); ``uvicorn`` (httptools, uvloop) and ``aiohttp`` run a raw app
  over the same worker (its admits pipelined on the store's connection, its store
  thread), so that only the HTTP server differs; ``threaded`` is the standard library's
  ``ThreadingHTTPServer``, a thread per connection calling the engine (its blocking
  client, a store connection per thread). uvicorn and aiohttp are the extra ``bench``
  (``pip install -e '.[bench]'``), not a dependency of policer.

Every measurement is bounded (``--seconds`` each, ``--repeats`` times; the whole run
takes about ``repeats x (4 x seconds + 10)`` seconds per stack) and everything it
starts is stopped when it ends. The machine is shared with the clients: the figures
include the clients' own CPU (on a 2-core machine about a quarter of the time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.processes import stop_group  # noqa: E402
from lab.redis_server import RedisServer, free_port  # noqa: E402
from policer import serve  # noqa: E402
from policer.serve.http_server import TOO_LARGE, UNAUTHORIZED  # noqa: E402
from policer.serve.service import JSON, Response  # noqa: E402

UNREACHED = 10_000_000
STACKS = ("httptools", "uvicorn", "aiohttp", "threaded")
SLICE_S = 0.25


# --------------------------------------------------------------------------- set-up


def bench_policy(source: Path, directory: Path) -> Path:
    """``source`` with every max raised out of reach and a namespace of its own."""
    text = source.read_text()
    text = re.sub(r"(\bmax:\s*)\d+", rf"\g<1>{UNREACHED}", text)
    text, n = re.subn(r"(?m)^namespace:.*$", f"namespace: servebench{os.getpid()}", text)
    if n != 1:
        raise SystemExit(f"{source}: needs one top-level namespace line")
    out = directory / "policy.yaml"
    out.write_text(text)
    return out


def call_mix(count: int = 512) -> list[dict[str, Any]]:
    rng = random.Random(42)
    numbers = ["5551234", "7654321", "3344556", "0301234567", "0897654321", "00441632960123",
               "0033140000000", "+12125550100"]
    out = []
    for _ in range(count):
        user = f"u{rng.randrange(96):02d}"
        n = rng.choice(numbers)
        headers = {"X-Account": f"acct{rng.randrange(12):02d}"} if rng.random() >= 0.2 else {}
        out.append({"from_user": user, "from_domain": "bench.invalid", "ruri_user": n,
                    "to_user": n, "source_ip": f"192.0.2.{rng.randrange(8) + 1}",
                    "auth_user": user, "headers": headers})
    return out


def requests(tag: str) -> Iterator[bytes]:
    """Whole ``POST /v1/admit`` requests, each with a new Call-ID (prepared: a request
    costs the client one formatting)."""
    parts = []
    for fields in call_mix():
        body = json.dumps({"call_id": "%CALLID%", "from_tag": "tag", **fields},
                          separators=(",", ":")).encode()
        before, after = body.split(b"%CALLID%")
        parts.append((before, after, len(before) + len(after)))
    head = (b"POST /v1/admit HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s%s%s")
    t = tag.encode()
    i = 0
    n = len(parts)
    while True:
        before, after, size = parts[i % n]
        cid = b"%s-%d" % (t, i)
        yield head % (size + len(cid), before, cid, after)
        i += 1


class Slices:
    """Time slices shared by processes (``perf_counter`` is CLOCK_MONOTONIC, one clock
    for all): in every four slices from ``start``, ``first`` runs in slices 0 and 3,
    the other side in 1 and 2 (ABBA), so both see the same machine."""

    def __init__(self, start: float, first: bool) -> None:
        self.start = start
        self.first = first

    def active(self, t: float) -> bool:
        if t < self.start:
            return True  # warm-up: everyone runs
        k = int((t - self.start) / SLICE_S) % 4
        return (k in (0, 3)) == self.first

    def wait(self, t: float) -> None:
        """Sleep until this side's next slice."""
        k = int((t - self.start) / SLICE_S)
        while True:
            k += 1
            if ((k % 4) in (0, 3)) == self.first:
                break
        time.sleep(max(0.0, self.start + k * SLICE_S - t))


# --------------------------------------------------------------------------- clients


def _read_answer(s: socket.socket, buf: bytearray) -> bytes:
    """One HTTP answer (with Content-Length) from ``s``; what follows stays in ``buf``."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            at = head.find(b"content-length:")
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15:stop if stop > 0 else len(head)]) if at >= 0 else 0
            total = end + 4 + length
            if len(buf) >= total:
                answer = bytes(buf[:total])
                del buf[:total]
                return answer
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk


def _http_loop(port: int, tag: str, until: float, measure_from: float,
               slices: Slices | None = None) -> tuple[int, int, array[float]]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    lat: array[float] = array("d")
    done = admitted = 0
    perf = time.perf_counter
    gen = requests(tag)
    while True:
        t0 = perf()
        if t0 >= until:
            break
        if slices is not None and not slices.active(t0):
            slices.wait(t0)
            continue
        s.sendall(next(gen))
        answer = _read_answer(s, buf)
        t1 = perf()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {answer[:200]!r}")
        if t0 >= measure_from:
            lat.append(t1 - t0)
            done += 1
            admitted += b'"admitted":true' in answer and b'"fallback":false' in answer
    s.close()
    return done, admitted, lat


def _engine_loop(url: str, policy_path: str, tag: str, until: float, measure_from: float,
                 slices: Slices | None = None) -> tuple[int, int, array[float]]:
    from policer.call import Call
    from policer.engine import Engine
    from policer.policy import load_policy
    from policer.store import open_store

    policy = load_policy(policy_path)
    store = open_store(url, policy.namespace, timeout_ms=policy.store_timeout_ms,
                       policy=policy)
    from policer.metrics import worker_metrics

    # as a proxy's engine runs (Engine.from_env): with its decision metrics
    engine = Engine(policy, store, node="bench-engine", metrics=worker_metrics())
    admit, from_raw = engine.admit, Call.from_raw
    mix = call_mix()
    lat: array[float] = array("d")
    done = admitted = i = 0
    perf = time.perf_counter
    while True:
        t0 = perf()
        if t0 >= until:
            break
        if slices is not None and not slices.active(t0):
            slices.wait(t0)
            continue
        f = mix[i % len(mix)]
        d = admit(from_raw(f"{tag}-{i}", "tag", from_user=f["from_user"],
                           from_domain=f["from_domain"], ruri_user=f["ruri_user"],
                           to_user=f["to_user"], source_ip=f["source_ip"],
                           auth_user=f["auth_user"], headers=f["headers"]))
        i += 1
        t1 = perf()
        if t0 >= measure_from:
            lat.append(t1 - t0)
            done += 1
            admitted += d.admitted and not d.fallback
    return done, admitted, lat


def _run_job(job: tuple[Any, ...], out: Any) -> None:
    kind, args = job[0], job[1:]
    try:
        result = _http_loop(*args) if kind == "http" else _engine_loop(*args)
        out.put((kind, result))
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))


def run_jobs(jobs: list[tuple[Any, ...]], until: float) -> dict[str, list[Any]]:
    """Run the jobs, each in a process of its own; their results by kind."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_run_job, args=(job, out), daemon=True) for job in jobs]
    for p in procs:
        p.start()
    results: dict[str, list[Any]] = {}
    try:
        for _ in procs:
            kind, r = out.get(timeout=max(1.0, until + 30 - time.perf_counter()))
            if kind == "error":
                raise RuntimeError(r)
            results.setdefault(kind, []).append(r)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return results


# --------------------------------------------------------------------------- servers


class Server:
    """``policer serve`` (stack ``httptools``: its own HTTP/1.1 server) or the same
    Service on another stack, as a process group of its own."""

    def __init__(self, stack: str, url: str, policy: Path, workers: int, log: Path,
                 root: Path = ROOT) -> None:
        self.port = free_port()
        env = {**os.environ, "POLICER_REDIS_URL": url, "POLICER_POLICY": str(policy),
               "POLICER_NODE": f"bench-serve-{self.port}", "POLICER_LOG_LEVEL": "warning",
               "PYTHONPATH": str(root)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        listen = f"127.0.0.1:{self.port}"
        if stack == "httptools":
            cmd = [sys.executable, "-m", "policer", "serve", "--listen", listen,
                   "--workers", str(workers)]
            if root != ROOT:  # another checkout, run from there (-m puts the working
                import site  # directory first), without site (the editable install's
                # finder would import this one), its packages by path
                env["PYTHONPATH"] = os.pathsep.join([str(root), *site.getsitepackages()])
                cmd.insert(1, "-S")
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_server", stack,
                   "--listen", listen, "--workers", str(workers)]
        self.log = log
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=root)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{stack} server exited: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: b\r\n\r\n")
                    if _read_answer(s, bytearray()).startswith(b"HTTP/1.1 200"):
                        time.sleep(0.3 * workers)  # every worker up
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{stack} server not ready in 20 s")

    def stop(self) -> None:
        stop_group(self.proc)


def _alt_server(stack: str, listen: str, workers: int) -> int:
    """Serve the same :class:`policer.serve.Service` on another stack, ``workers``
    processes sharing one socket as ``policer serve --workers`` does (for the
    comparison only). uvicorn and aiohttp run the worker's own admits and store thread
    (:class:`policer.serve.admits.Admits`: the store's admit pipeline, several calls in
    flight) in their event loop, so that only the HTTP server differs; the threaded
    server answers each request in its connection's thread (:meth:`Service.handle`,
    the engine's blocking calls, a store connection per thread). None has policer
    serve's bounds (MAX_HEAD counted as it arrives, head deadline, connection cap)."""
    from policer.engine import Engine
    from policer.exporter import parse_listen
    from policer.serve.ticker import Ticker

    host, port = parse_listen(listen)
    engine = Engine.from_env()
    engine.start()
    sock = serve.bind(host, port)
    service = serve.Service(engine)
    run = {"uvicorn": _uvicorn, "aiohttp": _aiohttp, "threaded": _threaded}[stack]
    children = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            Ticker(engine).start()
            run(service, sock)
            os._exit(0)
        children.append(pid)
    Ticker(engine).start()
    try:
        run(service, sock)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return 0


class LoopWorker:
    """A worker's admits and store thread in the event loop another server runs: the
    answer of one request (its credentials, its body read whole) as an awaitable."""

    def __init__(self, service: serve.Service) -> None:
        import asyncio

        from policer.serve.admits import Admits
        from policer.serve.store_thread import StoreThread

        self.service = service
        self.loop = asyncio.get_running_loop()
        self.store = StoreThread(service, self.loop)
        self.admits = Admits(service, self.loop, self.store)
        self.admits.start()

    async def answer(self, method: str, path: str, body: bytes,
                     authorization: bytes | None) -> Response:
        from policer.serve.bodies import BadRequest, admit_of
        from policer.serve.service import Job, error

        service = self.service
        if not service.authorized(authorization):
            return UNAUTHORIZED
        fut = self.loop.create_future()

        def done(r: Response) -> None:
            if not fut.done():
                fut.set_result(r)

        if method == "POST" and path == "/v1/admit":
            try:
                call, deadline = admit_of(body, service.engine)
            except BadRequest as e:
                return error(400, str(e))
            self.admits.add(call, done, deadline)
        else:
            r = service.route(method, path, body)
            if not isinstance(r, Job):
                return r
            self.store.job(done, r, path, head=method == "HEAD")
        response: Response = await fut
        return response

    def close(self) -> None:
        self.admits.close()
        self.store.close()


Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def asgi_app(service: serve.Service) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The raw ASGI application (no framework): reads the body (at most
    :data:`serve.MAX_BODY`) and answers it through the worker's admits and store
    thread (:class:`LoopWorker`, made at the lifespan's start, in uvicorn's loop)."""
    json_header = (b"content-type", JSON)
    worker: list[LoopWorker] = []

    def start() -> None:
        worker.append(LoopWorker(service))

    def stop() -> None:
        if worker:
            worker[0].close()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send, start, stop)
            return
        if kind != "http":
            return
        authorization = None
        length = -1
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else serve.MAX_BODY + 1
            elif name == b"authorization":
                authorization = value
        if length > serve.MAX_BODY:
            response = TOO_LARGE
        else:
            message = await receive()
            body: bytes = message.get("body", b"")
            while message.get("more_body"):
                message = await receive()
                body += message.get("body", b"")
                if len(body) > serve.MAX_BODY:
                    break
            response = (TOO_LARGE if len(body) > serve.MAX_BODY else await worker[0].answer(
                scope["method"], scope["path"], body, authorization))
        body_out = response.body
        length_header = (b"content-length", b"%d" % len(body_out))
        if response.content_type is JSON and not response.close:
            headers = [json_header, length_header]
        else:
            headers = [(b"content-type", response.content_type), length_header]
            if response.close:
                headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body_out})

    return app


async def _lifespan(receive: Receive, send: Send, on_startup: Callable[[], None] | None,
                    on_shutdown: Callable[[], None] | None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if on_startup is not None:
                on_startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _uvicorn(service: serve.Service, sock: socket.socket) -> None:
    """A raw ASGI app (no framework) on uvicorn, with its httptools parser and uvloop."""
    import uvicorn

    config = uvicorn.Config(asgi_app(service), loop="uvloop", http="httptools",
                            lifespan="on", access_log=False, log_level="warning",
                            server_header=False, date_header=False)
    uvicorn.Server(config).run(sockets=[sock])


def _aiohttp(service: serve.Service, sock: socket.socket) -> None:
    """aiohttp's low-level server (no router, no middlewares) with uvloop."""
    import asyncio

    import uvloop
    from aiohttp import web

    async def main() -> None:
        worker = LoopWorker(service)

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            if (request.content_length or 0) > serve.MAX_BODY:
                return web.Response(status=413)
            auth = request.headers.get("Authorization")
            r = await worker.answer(request.method, request.path, await request.read(),
                                    auth.encode() if auth is not None else None)
            return web.Response(status=r.status, body=r.body,
                                content_type=r.content_type.decode().split(";")[0])

        server = web.Server(handler, access_log=None)
        loop = asyncio.get_running_loop()
        await loop.create_server(server, sock=sock)
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(main())


def _threaded(service: serve.Service, sock: socket.socket) -> None:
    """The standard library's ThreadingHTTPServer, HTTP/1.1 keep-alive, a thread per
    connection, each request answered in it (:meth:`Service.handle`: the engine's
    blocking calls on the thread's own store connection)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    MAX_BODY = serve.MAX_BODY
    handle, authorized = service.handle, service.authorized

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _do(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                self.send_response(413)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.rfile.read(n) if n else b""
            auth = self.headers.get("Authorization")
            r = handle(self.command, self.path, body) if authorized(
                auth.encode() if auth is not None else None) else UNAUTHORIZED
            self.send_response(r.status)
            self.send_header("Content-Type", r.content_type.decode())
            self.send_header("Content-Length", str(len(r.body)))
            self.end_headers()
            self.wfile.write(r.body)

        do_GET = do_POST = _do

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self) -> None:
            pass

        def server_activate(self) -> None:
            pass

    srv = Server(sock.getsockname(), Handler, bind_and_activate=False)
    srv.socket = sock
    srv.serve_forever()


# --------------------------------------------------------------------------- hostile

#: What each hostile connection sends (and then keeps sending nothing, or trickles).
HOSTILE = ("header", "loris", "idle", "long")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (a supervisor's workers), KiB."""
    total = 0
    for proc in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            if int(text[text.rfind(")") + 2:].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def measure_hostile(url: str, policy: Path, workers: int, n: int, kind: str, log: Path,
                    root: Path = ROOT) -> dict[str, float]:
    """``n`` connections to ``policer serve``, each sending ``kind``: ``header``: a
    request whose one header line has no end, 15 KiB of it (under MAX_HEAD: the server
    holds it); ``loris``: a request line and a header line, then one more header line
    every second; ``idle``: nothing; ``long``: a header line of 256 KiB without an end
    (the server should stop it at MAX_HEAD). The server's resident memory before and
    with them open, how many it closed, and whether a request on a new connection is
    still answered meanwhile."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
    server = Server("httptools", url, policy, workers, log, root)
    socks: list[socket.socket] = []
    closed = 0
    try:
        time.sleep(0.5)
        before = rss_kib(server.proc.pid)
        head = b"POST /v1/admit HTTP/1.1\r\nHost: bench\r\nX-Hostile: "
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            socks.append(c)
            try:
                if kind == "header":
                    c.sendall(head + b"h" * (15 * 1024))
                elif kind == "loris":
                    c.sendall(b"POST /v1/admit HTTP/1.1\r\nHost: bench\r\n")
                elif kind == "long":
                    c.sendall(head)
                    for _ in range(64):
                        c.sendall(b"l" * 4096)
            except OSError:
                closed += 1
        t_end = time.monotonic() + 3.0  # settle; the loris clients trickle meanwhile
        while time.monotonic() < t_end:
            if kind == "loris":
                for c in socks:
                    with contextlib.suppress(OSError):
                        c.sendall(b"X-Drip: 1\r\n")
            time.sleep(1.0)
        during = rss_kib(server.proc.pid)
        for c in socks:  # closed by the server (an answer, then EOF, or a reset)?
            c.setblocking(False)
            try:
                data = c.recv(65536)
                closed += data == b"" or data.startswith(b"HTTP/1.1 4")
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
                c.sendall(b"GET /v1/health HTTP/1.1\r\nHost: bench\r\n\r\n")
                served = _read_answer(c, bytearray()).startswith(b"HTTP/1.1 200")
        except OSError:
            served = False
    finally:
        for c in socks:
            c.close()
        server.stop()
    return {"rss_before_mib": before / 1024, "rss_during_mib": during / 1024,
            "grown_mib": (during - before) / 1024,
            "per_connection_kib": (during - before) / max(1, n),
            "closed_by_server": min(closed, n), "health_answered": float(served)}


# --------------------------------------------------------------------------- freeze


_DIALOG_ID = re.compile(rb'"dialog_id":"([^"]*)"')


def _event(path: bytes, dialog: bytes) -> bytes:
    body = b'{"dialog_id":"%s"}' % dialog
    return b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" \
        b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)


def _freeze_client(port: int, tag: str, conns: int, until: float, calls: bool,
                   out: Any) -> None:
    """``conns`` keep-alive connections, each in a closed loop (the next request as
    soon as the last is answered), driven by one selector; ``calls``: each admitted
    call is then confirmed and released on the same connection (the requests a proxy
    sends per call), else admits only. Per answer: (sent at, seconds, kind, by the
    fallback or queued)."""
    import selectors

    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    # per connection: read buffer, sent at, kind sent, the admits to send, dialog id
    state: dict[int, list[Any]] = {}
    rows: list[tuple[float, float, str, bool]] = []
    perf = time.perf_counter
    try:
        for i in range(conns):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            socks.append(s)
            gen = requests(f"{tag}c{i}")
            state[s.fileno()] = [bytearray(), perf(), "admit", gen, b""]
            s.sendall(next(gen))
            sel.register(s, selectors.EVENT_READ)
        while perf() < until:
            for key, _ in sel.select(timeout=0.5):
                s = cast(socket.socket, key.fileobj)
                st = state[s.fileno()]
                buf = st[0]
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed a connection")
                buf += chunk
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = bytes(buf[:end]).lower()
                at = head.find(b"content-length:")
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15:stop if stop > 0 else len(head)])
                if len(buf) < end + 4 + length:
                    continue
                answer = bytes(buf[:end + 4 + length])
                del buf[:end + 4 + length]
                t1 = perf()
                kind = st[2]
                if not answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 202")):
                    raise RuntimeError(f"unexpected answer: {answer[:200]!r}")
                rows.append((st[1], t1 - st[1], kind,
                             b'"fallback":true' in answer or b'"queued":true' in answer))
                if kind == "admit" and calls and b'"admitted":true' in answer:
                    m = _DIALOG_ID.search(answer)
                    st[4] = m.group(1) if m else b""
                    st[2], request = "confirm", _event(b"/v1/confirm", st[4])
                elif kind == "confirm":
                    st[2], request = "release", _event(b"/v1/release", st[4])
                else:
                    st[2], request = "admit", next(st[3])
                st[1] = perf()
                s.sendall(request)
        out.put(("freeze", rows))
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))
    finally:
        for s in socks:
            s.close()


def measure_freeze(redis_server: RedisServer, policy: Path, workers: int, clients: int,
                   connections: int, freeze_s: float, calls: bool, log: Path,
                   root: Path = ROOT) -> dict[str, float]:
    """``connections`` closed-loop connections (``clients`` processes) send admits
    (``calls``: and each admitted call's confirm and release) to ``policer serve``;
    after 1 s the private redis-server is frozen (SIGSTOP) for ``freeze_s`` seconds,
    then thawed, then 1 s more. The answer times of the requests sent while it was
    frozen: p50, p99, max (ms) of all and the max of each kind, how many, and the
    share answered by the fallback (admits) or queued (events)."""
    server = Server("httptools", redis_server.url, policy, workers, log, root)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    try:
        start = time.perf_counter() + 0.5
        frozen_at, thawed_at = start + 1.0, start + 1.0 + freeze_s
        until = thawed_at + 1.0
        tag = f"fz{time.monotonic_ns()}"
        per = [connections // clients + (i < connections % clients) for i in range(clients)]
        procs = [ctx.Process(target=_freeze_client, args=(server.port, f"{tag}p{i}", n,
                                                          until, calls, out), daemon=True)
                 for i, n in enumerate(per) if n]
        for p in procs:
            p.start()
        time.sleep(max(0.0, frozen_at - time.perf_counter()))
        frozen_at = time.perf_counter()
        redis_server.signal(signal.SIGSTOP)
        try:
            time.sleep(max(0.0, thawed_at - time.perf_counter()))
        finally:
            thawed_at = time.perf_counter()
            redis_server.signal(signal.SIGCONT)
        rows: list[tuple[float, float, str, bool]] = []
        for _ in procs:
            kind, r = out.get(timeout=until + 60 - time.perf_counter())
            if kind == "error":
                raise RuntimeError(r)
            rows += r
        for p in procs:
            p.join(timeout=5)
    finally:
        redis_server.signal(signal.SIGCONT)
        server.stop()
    during = [r for r in rows if frozen_at <= r[0] < thawed_at]
    lat = [r[1] for r in during]
    out_: dict[str, float] = {
        "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
        "max_ms": max(lat, default=float("nan")) * 1e3, "answers": len(lat),
        "fallback": sum(r[3] for r in during) / max(1, len(during)),
        "before_p50_ms": pct([r[1] for r in rows if r[0] < frozen_at], 0.5) * 1e3}
    for kind in ("admit", "confirm", "release") if calls else ("admit",):
        out_[f"{kind}_max_ms"] = max((r[1] for r in during if r[2] == kind),
                                     default=float("nan")) * 1e3
    return out_


# --------------------------------------------------------------------------- measuring


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))]


def measure_latency(stack: str, url: str, policy: Path, seconds: float, warmup: float,
                    log: Path, root: Path = ROOT) -> dict[str, float]:
    """One engine process and one HTTP client (server: one worker), in ABBA slices."""
    server = Server(stack, url, policy, 1, log, root)
    try:
        now = time.perf_counter()
        start = now + 1  # every process started
        measured, until = start + warmup, start + warmup + 2 * seconds
        tag = f"lat{stack}{time.monotonic_ns()}"
        r = run_jobs([("engine", url, str(policy), tag + "e", until, measured,
                       Slices(start, True)),
                      ("http", server.port, tag + "h", until, measured,
                       Slices(start, False))], until)
    finally:
        server.stop()
    e, h = list(r["engine"][0][2]), list(r["http"][0][2])
    return {"engine_p50_us": pct(e, 0.5) * 1e6, "engine_p99_us": pct(e, 0.99) * 1e6,
            "http_p50_us": pct(h, 0.5) * 1e6, "http_p99_us": pct(h, 0.99) * 1e6,
            "delta_p50_us": (pct(h, 0.5) - pct(e, 0.5)) * 1e6,
            "engine_n": len(e), "http_n": len(h),
            "engine_admitted": r["engine"][0][1] / max(1, len(e)),
            "http_admitted": r["http"][0][1] / max(1, len(h))}


def measure_throughput(stack: str, url: str, policy: Path, workers: int, connections: int,
                       seconds: float, warmup: float, log: Path,
                       root: Path = ROOT) -> dict[str, float]:
    """``workers`` engine processes against ``policer serve --workers N`` driven by
    ``connections`` client processes, in ABBA slices: each side runs alone half the
    time; decisions/s over its own slices."""
    server = Server(stack, url, policy, workers, log, root)
    try:
        now = time.perf_counter()
        start = now + 1  # every process started
        measured, until = start + warmup, start + warmup + 2 * seconds
        tag = f"tp{stack}{time.monotonic_ns()}"
        jobs: list[tuple[Any, ...]] = [
            ("engine", url, str(policy), f"{tag}e{i}", until, measured, Slices(start, True))
            for i in range(workers)]
        jobs += [("http", server.port, f"{tag}h{i}", until, measured, Slices(start, False))
                 for i in range(connections)]
        r = run_jobs(jobs, until)
    finally:
        server.stop()
    engine_rate = sum(x[0] for x in r["engine"]) / seconds
    http_rate = sum(x[0] for x in r["http"]) / seconds
    return {"engine_per_s": engine_rate, "http_per_s": http_rate,
            "engine_admitted": sum(x[1] for x in r["engine"]) / max(1, sum(
                x[0] for x in r["engine"])),
            "http_admitted": sum(x[1] for x in r["http"]) / max(1, sum(
                x[0] for x in r["http"])),
            "ratio": http_rate / engine_rate if engine_rate else float("nan")}


def wrk_script(directory: Path) -> Path:
    """A wrk script sending the same call mix as the Python client, a fresh Call-ID per
    request (a random prefix per wrk thread and run, then a counter)."""
    bodies = []
    for fields in call_mix():
        body = json.dumps({"call_id": "%CALLID%", "from_tag": "tag", **fields},
                          separators=(",", ":"))
        before, after = body.split("%CALLID%")
        bodies.append(f"{{{json.dumps(before)},{json.dumps(after)}}}")
    path = directory / "admit.lua"
    path.write_text(
        "local mix = {" + ",\n".join(bodies) + "}\n"
        "local n = 0\n"
        "local tag = nil\n"
        "wrk.method = 'POST'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
        "request = function()\n"
        "  if tag == nil then tag = 'w' .. math.random(1, 1000000000) .. os.time() end\n"
        "  n = n + 1\n"
        "  local m = mix[(n % #mix) + 1]\n"
        "  return wrk.format(nil, '/v1/admit', nil, m[1] .. tag .. '-' .. n .. m[2])\n"
        "end\n")
    return path


def measure_throughput_wrk(stack: str, url: str, policy: Path, workers: int,
                           connections: int, seconds: float, warmup: float, log: Path,
                           script: Path) -> dict[str, float]:
    """As :func:`measure_throughput`, the HTTP side driven by wrk (a C client: the
    server's capacity with little client CPU on the machine) in 1 s slices: wrk runs
    for each of the HTTP side's two slices in four."""
    server = Server(stack, url, policy, workers, log)
    slice_s = 1.0
    try:
        now = time.perf_counter()
        start = now + 1
        rounds = max(1, round(seconds / (2 * slice_s)))
        measured, until = start + 4 * slice_s, start + 4 * slice_s + rounds * 4 * slice_s
        tag = f"tpw{time.monotonic_ns()}"
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=_run_job, args=(
            ("engine", url, str(policy), f"{tag}e{i}", until, measured,
             _SlicesOf(start, slice_s)), out), daemon=True) for i in range(workers)]
        for p in procs:
            p.start()
        done = 0
        k = 0
        while True:
            t = start + k * slice_s
            if t >= until:
                break
            if k % 4 == 1:  # the HTTP side's two slices: 1 and 2 of every four
                time.sleep(max(0.0, t - time.perf_counter()))
                proc = subprocess.run(
                    ["wrk", "-t1", f"-c{connections}", f"-d{int(2 * slice_s)}s", "-s",
                     str(script), f"http://127.0.0.1:{server.port}"],
                    capture_output=True, text=True, timeout=30, check=True)
                m = re.search(r"(\d+) requests in", proc.stdout)
                if t >= measured and m:
                    done += int(m.group(1))
            k += 1
        engine = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=5)
    finally:
        server.stop()
    for kind, r in engine:
        if kind == "error":
            raise RuntimeError(r)
    measured_s = rounds * 2 * slice_s
    engine_rate = sum(r[0] for _, r in engine) / measured_s
    http_rate = done / measured_s
    return {"engine_per_s": engine_rate, "http_per_s": http_rate,
            "ratio": http_rate / engine_rate if engine_rate else float("nan")}


class _SlicesOf(Slices):
    def __init__(self, start: float, slice_s: float) -> None:
        super().__init__(start, True)
        self.slice_s = slice_s

    def active(self, t: float) -> bool:
        k = int((t - self.start) / self.slice_s) % 4 if t >= self.start else 0
        return k in (0, 3)

    def wait(self, t: float) -> None:
        k = int((t - self.start) / self.slice_s)
        while True:
            k += 1
            if (k % 4) in (0, 3):
                break
        time.sleep(max(0.0, self.start + k * self.slice_s - t))


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default="httptools",
                   help=f"servers to measure, comma-separated: {', '.join(STACKS)} "
                        "(httptools is `policer serve`) [httptools]")
    p.add_argument("--policy", default=str(ROOT / "policies" / "example.yaml"))
    p.add_argument("--redis", default=None, metavar="URL",
                   help="Redis to use (default: a private redis-server)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run [4]")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; medians [3]")
    p.add_argument("--workers", type=int, default=2, help="workers / engine processes [2]")
    p.add_argument("--connections", type=int, default=4,
                   help="client connections for the throughput run (one process each) [4]")
    p.add_argument("--only", choices=("latency", "throughput"), default=None)
    p.add_argument("--wrk", action="store_true",
                   help="also measure the throughput with wrk as the HTTP client (Debian "
                        "package wrk)")
    p.add_argument("--freeze", type=float, default=None, metavar="SECONDS",
                   help="instead: answer times of admits sent while the private "
                        "redis-server is frozen (SIGSTOP) this long, under load from "
                        "--connections connections in --clients processes")
    p.add_argument("--clients", type=int, default=2,
                   help="client processes of the --freeze run [2]")
    p.add_argument("--freeze-mix", choices=("calls", "admits"), default="calls",
                   help="--freeze: each admitted call is confirmed and released "
                        "(calls), or admits only [calls]")
    p.add_argument("--serve-root", default=str(ROOT), metavar="DIR",
                   help="the checkout policer serve runs from (a before/after "
                        "comparison; not with --wrk) [this one]")
    p.add_argument("--hostile", type=int, default=None, metavar="N",
                   help="instead: policer serve's memory with N hostile connections "
                        "open (--hostile-kind)")
    p.add_argument("--hostile-kind", choices=HOSTILE, default="header",
                   help="what each --hostile connection sends [header]")
    p.add_argument("--json", action="store_true")
    p.add_argument("--_server", default=None, help=argparse.SUPPRESS)
    p.add_argument("--listen", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._server:
        return _alt_server(args._server, args.listen, args.workers)
    stacks = [s for s in args.stacks.split(",") if s]
    for s in stacks:
        if s not in STACKS:
            p.error(f"unknown stack {s!r}")
    if not 0 < args.seconds <= 60 or not 0 < args.repeats <= 10:
        p.error("--seconds in (0, 60], --repeats in 1..10")

    tmp = Path(tempfile.mkdtemp(prefix="policer-servebench-"))
    policy = bench_policy(Path(args.policy), tmp)
    if args.freeze is not None:
        if args.redis is not None:
            p.error("--freeze freezes a private redis-server: no --redis")
        if not 0 < args.freeze <= 30 or not 1 <= args.clients <= args.connections:
            p.error("--freeze in (0, 30], --clients in 1..--connections")
        return freeze_report(args, argv, policy, tmp)
    if args.hostile is not None:
        if not 1 <= args.hostile <= 10_000:
            p.error("--hostile in 1..10000")
        return hostile_report(args, argv, policy, tmp)
    redis_server = None
    url = args.redis
    if url is None:
        redis_server = RedisServer().start()
        url = redis_server.url
    from policer.policy import load_policy
    from policer.store import open_store

    pol = load_policy(policy)
    open_store(url, pol.namespace, timeout_ms=2000, policy=pol).load(pol)
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/serve.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}, "
                   f"Python {platform.python_version()}",
        "load_before": loadavg(), "stacks": {}}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        stack: {"latency": [], "throughput": []} for stack in stacks}
    try:
        # interleaved: run r measures every stack, the order turned by one each run, so
        # that no stack always meets the machine first or last
        for r in range(args.repeats):
            k = r % len(stacks)
            for stack in stacks[k:] + stacks[:k]:
                mine = runs[stack]
                root = Path(args.serve_root)
                log = tmp / f"{stack}.log"
                if args.only != "throughput":
                    mine["latency"].append(measure_latency(
                        stack, url, policy, args.seconds, args.warmup, log, root))
                if args.only != "latency":
                    mine["throughput"].append(measure_throughput(
                        stack, url, policy, args.workers, args.connections, args.seconds,
                        args.warmup, log, root))
                if args.wrk and args.only != "latency":
                    mine.setdefault("throughput_wrk", []).append(measure_throughput_wrk(
                        stack, url, policy, args.workers, args.connections, args.seconds,
                        args.warmup, log, wrk_script(tmp)))
                if not args.json:
                    print(f"{stack} run {r + 1}: " + json.dumps(
                        {k: {m: round(x, 3) for m, x in v[-1].items()}
                         for k, v in mine.items() if v}), flush=True)
        for stack in stacks:
            med = {kind: {k: statistics.median(x[k] for x in v) for k in v[0]}
                   for kind, v in runs[stack].items() if v}
            report["stacks"][stack] = {"median": med, "runs": runs[stack]}
    finally:
        if redis_server is not None:
            redis_server.stop()
    report["load_after"] = loadavg()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"\n{report['machine']}; load {report['load_before']} -> {report['load_after']}")
        for stack, r in report["stacks"].items():
            m = r["median"]
            line = f"{stack:<9}"
            if "latency" in m:
                lat = m["latency"]
                line += (f" p50 engine {lat['engine_p50_us']:.0f} us, http "
                         f"{lat['http_p50_us']:.0f} us (+{lat['delta_p50_us']:.0f} us); p99 "
                         f"engine {lat['engine_p99_us']:.0f}, http {lat['http_p99_us']:.0f} us;")
            if "throughput" in m:
                t = m["throughput"]
                line += (f" x{args.workers}: engine {t['engine_per_s']:.0f}/s, http "
                         f"{t['http_per_s']:.0f}/s ({t['ratio']:.2f}x)")
            if "throughput_wrk" in m:
                t = m["throughput_wrk"]
                line += (f"; with wrk: engine {t['engine_per_s']:.0f}/s, http "
                         f"{t['http_per_s']:.0f}/s ({t['ratio']:.2f}x)")
            print(line)
    return 0


def hostile_report(args: argparse.Namespace, argv: list[str] | None, policy: Path,
                   tmp: Path) -> int:
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/serve.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}, "
                   f"Python {platform.python_version()}", "runs": []}
    from policer.policy import load_policy
    from policer.store import open_store

    pol = load_policy(policy)
    with RedisServer() as redis_server:
        open_store(redis_server.url, pol.namespace, timeout_ms=2000, policy=pol).load(pol)
        for r in range(args.repeats):
            run = measure_hostile(redis_server.url, policy, args.workers, args.hostile,
                                  args.hostile_kind, tmp / "hostile.log",
                                  Path(args.serve_root))
            report["runs"].append(run)
            if not args.json:
                print(f"hostile run {r + 1}: " + json.dumps({k: round(v, 1) for k, v in
                                                             run.items()}), flush=True)
    report["median"] = {k: statistics.median(x[k] for x in report["runs"])
                        for k in report["runs"][0]}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        m = report["median"]
        print(f"\n{report['machine']}")
        print(f"{args.hostile} connections ({args.hostile_kind}), --workers {args.workers}: "
              f"RSS {m['rss_before_mib']:.1f} -> {m['rss_during_mib']:.1f} MiB "
              f"(+{m['grown_mib']:.1f} MiB, {m['per_connection_kib']:.1f} KiB each); "
              f"{m['closed_by_server']:.0f} closed by the server; a new request "
              f"{'answered' if m['health_answered'] else 'NOT answered'} meanwhile "
              f"(medians of {args.repeats})")
    return 0


def freeze_report(args: argparse.Namespace, argv: list[str] | None, policy: Path,
                  tmp: Path) -> int:
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/serve.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}, "
                   f"Python {platform.python_version()}",
        "load_before": loadavg(), "runs": []}
    from policer.policy import load_policy
    from policer.store import open_store

    pol = load_policy(policy)
    report["store_timeout_ms"] = pol.store_timeout_ms
    for r in range(args.repeats):
        with RedisServer() as redis_server:  # a fresh one each run: no queue left over
            open_store(redis_server.url, pol.namespace, timeout_ms=2000,
                       policy=pol).load(pol)
            run = measure_freeze(redis_server, policy, args.workers, args.clients,
                                 args.connections, args.freeze, args.freeze_mix == "calls",
                                 tmp / "freeze.log", Path(args.serve_root))
        report["runs"].append(run)
        if not args.json:
            print(f"freeze run {r + 1}: " + json.dumps({k: round(v, 2) for k, v in
                                                        run.items()}), flush=True)
    report["median"] = {k: statistics.median(x[k] for x in report["runs"])
                        for k in report["runs"][0]}
    report["load_after"] = loadavg()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        m = report["median"]
        print(f"\n{report['machine']}; load {report['load_before']} -> "
              f"{report['load_after']}")
        print(f"store frozen {args.freeze:g} s, store_timeout {pol.store_timeout_ms} ms, "
              f"{args.connections} connections ({args.freeze_mix}), --workers "
              f"{args.workers}: answers during the freeze p50 {m['p50_ms']:.1f} ms, p99 "
              f"{m['p99_ms']:.1f} ms, max {m['max_ms']:.1f} ms ({m['answers']:.0f} answers, "
              f"{m['fallback'] * 100:.0f} % by the fallback or queued; medians of "
              f"{args.repeats}); max by kind: " + ", ".join(
                  f"{k[:-7]} {v:.1f} ms" for k, v in m.items() if k.endswith("_max_ms")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
