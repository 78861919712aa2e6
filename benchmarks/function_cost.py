"""Redis CPU per whole call of the decision function, without Kamailio: a quick loop
for the lean-function work (issue 16), whose figures `deploy/kamailio/bench` confirms.

Worker processes play proxies: each places calls at a paced rate, one admit ``FCALL``
per call as its own round trip (mode ``A``, with a deadline, as the native cfg sends
it), and every 100 ms sends one batch ``FCALL`` of the answers and ends its calls had
meanwhile (``c`` ops some ms after the admit, ``r`` ops after ``--hold-ms``), as a
proxy's timer does. The reference, ``ping``, sends one ``PING`` per call instead,
nothing else (the bench's ``roundtrip`` flavour). Redis's CPU comes from its own
``INFO cpu``, over the run and the settle time after it; flavours interleave within
each repeat; figures are medians.

    .venv/bin/python -m benchmarks.function_cost --memberships 1,2,4,6 --rate 1500
    .venv/bin/python -m benchmarks.function_cost --policy my.yaml --live 100000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hiredis
import redis

from lab.redis_server import RedisServer
from policer.call import Call
from policer.policy import Policy, load_policy, parse_policy
from policer.protocol import NATIVE_REPLY
from policer.store import RedisStore

NODE = "bench-node"


def membership_policy(n: int, users: int) -> str:
    """A policy whose calls join ``n`` profiles (1: total; 2: + class; 4: + user, account;
    6: + domestic-by-source and a header profile), limits nothing reaches."""
    profiles = ["total: {}", "local: {when: {class: local}}", "user: {value: from_user}",
                "account: {value: account}", "source: {value: source_ip}",
                "tenant: {value: tenant}"][:n]
    limits = [f"{p.split(':')[0]}: {{max: 1000000}}" for p in profiles]
    return f"""
version: 1
namespace: fcost{n}
call:
  attributes:
    account: header:X-Account
    tenant: header:X-Tenant
classes:
  emergency: {{numbers: ["112"]}}
  international: {{prefixes: ["00"]}}
  local: {{default: true}}
profiles:
  {chr(10).join('  ' + p for p in profiles).strip()}
limits:
  {chr(10).join('  ' + x for x in limits).strip()}
timeouts: {{early: 120s, dialog: 1h}}
on_store_error: reject
"""


def _read(sock: socket.socket, reader: Any) -> Any:
    while True:
        r = reader.gets()
        if r is not False:
            return r
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("redis closed the connection")
        reader.feed(data)


def worker(url_port: int, flavour: str, policy_text: str | None, policy_path: str | None,
           rate: float, seconds: float, hold_ms: int, users: int, seed: int,
           out: Any) -> None:
    """One proxy: paced admits (or PINGs), batches of answers and ends every 100 ms."""
    random.seed(seed)
    sock = socket.create_connection(("127.0.0.1", url_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    store = None
    if flavour != "ping":
        policy = (parse_policy(policy_text, "<bench>") if policy_text is not None
                  else load_policy(policy_path or ""))
        store = RedisStore(f"redis://127.0.0.1:{url_port}/0", policy.namespace, policy=policy)
    interval = 1.0 / rate
    t0 = time.monotonic()
    nxt = t0
    next_flush = t0 + 0.1
    answered: list[tuple[float, bytes]] = []  # (admitted at, dialog id)
    up: list[tuple[float, bytes]] = []
    did_at = NATIVE_REPLY.index("dialog_id")
    placed = admitted = 0
    seq = 0
    while True:
        now = time.monotonic()
        if now >= t0 + seconds and not answered and not up:
            break
        if now < t0 + seconds and now >= nxt:
            nxt += interval
            placed += 1
            if store is None:
                sock.sendall(b"PING\r\n")
                _read(sock, reader)
                continue
            seq += 1
            cid = f"{seed}-{seq}@bench".encode()
            user = f"u{random.randrange(users)}"
            call = Call.from_raw(cid.decode(), "t", from_user=user, from_domain="bench.example",
                                 ruri_user="5551234", source_ip=f"10.0.{seq % 200}.1",
                                 headers={"X-Account": f"a{random.randrange(users)}",
                                          "X-Tenant": f"t{seed}"})
            args = store.call_arguments(call, NODE, "A", store.deadline_ms(5000))
            sock.sendall(hiredis.pack_command(("FCALL", store.library.function("admit"), 1,
                                               store.library.prefix, *args)))
            r = _read(sock, reader)
            if isinstance(r, list) and r and r[0] == 1:
                admitted += 1
                answered.append((now, r[did_at]))
        if store is not None and now >= next_flush:
            next_flush = now + 0.1
            # the native cfg's dialog events: line ops naming the dialog by the id its
            # admit answered
            ops: list[bytes] = []
            for item in answered:  # answered some ms after the admit
                ops.append(b"+" + item[1] + b"\n")
                up.append(item)
            answered = []
            still: list[tuple[float, bytes]] = []
            for item in up:
                if now - item[0] >= hold_ms / 1000:
                    ops.append(b"-" + item[1] + b" bye\n")
                else:
                    still.append(item)
            up = still
            if ops:
                batch: tuple[Any, ...] = ("FCALL", store.library.function("batch"), 1,
                                          store.library.prefix, b"".join(ops), 0, 0,
                                          store.library.attributes_sig)
                sock.sendall(hiredis.pack_command(batch))
                _read(sock, reader)
        time.sleep(max(0.0, min(nxt, next_flush) - time.monotonic()))
    out.put((placed, admitted))
    sock.close()


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def prefill(server: RedisServer, policy: Policy, live: int) -> None:
    """``live`` dialogs up for the whole run (another node's, answered, 1 h)."""
    store = RedisStore(server.url, policy.namespace, timeout_ms=10_000, policy=policy)
    fn = store.library.function("admit")
    client = redis.Redis.from_url(server.url)
    batch = 2_000
    for start in range(0, live, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(live, start + batch)):
            call = Call.from_raw(f"live-{i}@bench", "t", from_user=f"u{i % 400}",
                                 from_domain="bench.example", ruri_user="5551234",
                                 source_ip="10.9.0.1", headers={"X-Account": f"a{i % 400}"})
            pipe.execute_command("FCALL", fn, 1, store.library.prefix,  # type: ignore[no-untyped-call]
                                 *store.call_arguments(call, "filler", "A"))
        pipe.execute()
    client.close()
    store.close()


def run_once(flavour: str, policy_text: str | None, policy_path: str | None,
             args: argparse.Namespace) -> dict[str, float]:
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        if flavour != "ping":
            policy = (parse_policy(policy_text, "<bench>") if policy_text is not None
                      else load_policy(policy_path or ""))
            RedisStore(server.url, policy.namespace, policy=policy).load(policy)
            if args.live:
                prefill(server, policy, args.live)
        mem0 = int(client.info("memory")["used_memory"])
        q: Any = multiprocessing.Queue()
        procs = [multiprocessing.Process(
            target=worker, args=(server.port, flavour, policy_text, policy_path,
                                 args.rate / args.workers, args.seconds, args.hold_ms,
                                 args.users, i + 1, q)) for i in range(args.workers)]
        cpu0 = redis_cpu(client)
        for p in procs:
            p.start()
        results = [q.get(timeout=args.seconds + args.hold_ms / 1000 + 60) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        time.sleep(args.settle)
        cpu = redis_cpu(client) - cpu0
        placed = sum(r[0] for r in results)
        mem = int(client.info("memory")["used_memory"]) - mem0
        client.close()
        return {"calls": placed, "admitted": sum(r[1] for r in results),
                "redis_us": cpu / max(placed, 1) * 1e6, "mem_delta": mem}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memberships", default="", help="e.g. 1,2,4,6 (generated policies)")
    ap.add_argument("--policy", action="append", default=[], help="policy files (repeat)")
    ap.add_argument("--rate", type=float, default=1500, help="calls/s offered in all")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--hold-ms", type=int, default=1000)
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--live", type=int, default=0, help="dialogs up before and during")
    ap.add_argument("--settle", type=float, default=1.5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    subjects: list[tuple[str, str | None, str | None]] = [("ping", None, None)]
    for n in [int(x) for x in args.memberships.split(",") if x.strip()]:
        subjects.append((f"{n} membership{'s' if n > 1 else ''}",
                         membership_policy(n, args.users), None))
    for path in args.policy:
        subjects.append((Path(path).name, None, path))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in subjects}
    for r in range(args.repeats):
        for name, text, path in subjects:
            res = run_once("ping" if name == "ping" else "fcall", text, path, args)
            runs[name].append(res)
            print(f"repeat {r + 1} {name:<16} calls={res['calls']:.0f} "
                  f"redis µs/call={res['redis_us']:.1f}", flush=True)
    ping = statistics.median(x["redis_us"] for x in runs["ping"])
    print(f"\nRedis CPU per whole call, medians of {args.repeats} (rate {args.rate:.0f}/s, "
          f"hold {args.hold_ms} ms, {args.users} users, live {args.live}):")
    print(f"{'subject':<18}{'µs/call':>9}{'x PING':>8}  each")
    table: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        med = statistics.median(x["redis_us"] for x in rs)
        table[name] = {"us": med, "x_ping": med / ping if ping else 0.0,
                       "each": [round(x["redis_us"], 1) for x in rs]}
        print(f"{name:<18}{med:>9.1f}{med / ping:>8.2f}  "
              f"{', '.join(f'{x:.1f}' for x in table[name]['each'])}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "table": table}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    sys.exit(main())
