"""Soak: several proxy nodes (processes) keep a random call mix going for
``POLICER_SOAK_SECONDS`` (default 300) while faults are injected on a
schedule into real processes: Redis killed and restarted empty (twice, each
followed by ``reconcile`` from the nodes' own dialog lists), a node killed -9
and restarted, Redis paused (SIGSTOP) for longer than the store bound.

Checked at the end, once leases and deadlines have passed: every count is 0,
no limit was exceeded while Redis was reachable (outside the fault windows),
every node exited cleanly with nothing left queued. The report lists each
fault with its measured effect (printed; also written to
``POLICER_SOAK_REPORT`` when set); docs/reliability.md records a run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lab.redis_server import RedisServer
from policer.call import Call
from policer.engine import Engine
from policer.policy import parse_policy
from policer.reconcile import ProxyDialog, reconcile
from policer.store import RedisStore, StoreError
from tests.support import new_namespace, wait_for
from tests.support.policies import ACCOUNT, INTERNATIONAL, policy_yaml, when

SECONDS = float(os.environ.get("POLICER_SOAK_SECONDS", "300"))
HERE = Path(__file__).resolve().parent

def soak_policy(namespace: str) -> str:
    return policy_yaml(
        namespace, attributes=ACCOUNT,
        classes={"emergency": {"numbers": ["112"]}, "international": {"prefixes": ["00"]},
                 "domestic": {"prefixes": ["0"]}, "local": {"default": True}},
        profiles={"total": {}, "emergency": when("emergency"),
                  "international": when("international"), "user": "from_user",
                  "account": "account"},
        limits={"total": {"max": 40, "reserve_for_emergency": 2},
                "international": {"max": 10, "reject": INTERNATIONAL},
                "account": {"max": 9, "reject": {"code": 486, "reason": "Account Call Limit"}},
                "user": 3},
        timeouts={"early": "10s", "dialog": "20s"}, store_timeout="100ms",
        on_store_error="admit", nodes={"lease": "6s", "renew": "1s"})


TOTAL_ORDINARY_MAX = 38  # total max - reserve
INTERNATIONAL_MAX = 10
MAX_HOLD = 5.0


class Soak:
    def __init__(self, tmp: Path) -> None:
        self.ns = new_namespace()
        self.policy_path = tmp / "soak.yaml"
        self.policy_path.write_text(soak_policy(self.ns))
        self.policy = parse_policy(self.policy_path.read_text())
        self.state = tmp / "state"
        self.state.mkdir()
        self.redis = RedisServer().start()
        self.store = RedisStore(self.redis.url, self.ns, timeout_ms=500)
        self.engine = Engine(self.policy, self.store, node="soak-operator")
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.samples: list[tuple[float, int, int, int]] = []  # t, ordinary, intl, unreachable
        self.windows: list[tuple[float, float]] = []
        self.faults: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._stop_sampling = threading.Event()
        self._seed = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start_worker(self, node: str, rate: int = 18) -> None:
        self._seed += 1
        self.workers[node] = subprocess.Popen(
            [sys.executable, str(HERE / "soak_worker.py"), node, str(self.policy_path),
             self.redis.url, str(self.state), str(rate), str(self._seed)],
            cwd=HERE.parent, stderr=subprocess.DEVNULL)

    def sample_forever(self) -> None:
        while not self._stop_sampling.wait(0.2):
            try:
                total = self.store.profile_size("total")
                sos = self.store.profile_size("emergency")
                intl = self.store.profile_size("international")
                self.samples.append((self.now(), total - sos, intl, 0))
            except StoreError:
                self.samples.append((self.now(), 0, 0, 1))

    def tallies(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.state.glob("*.dialogs.json"):
            try:
                t = json.loads(f.read_text())["tally"]
            except (OSError, ValueError, KeyError):
                continue
            for k, v in t.items():
                out[k] = out.get(k, 0) + v
        return out

    def wait_redis(self, limit: float = 30) -> float:
        start = time.monotonic()
        while not self.store.ping():
            if time.monotonic() - start > limit:
                raise AssertionError("Redis did not come back")
            time.sleep(0.05)
        return time.monotonic() - start

    def drained(self, since: float) -> bool:
        """Every running node has ticked since ``since`` (``time.time()``) and has
        nothing queued for the store."""
        for node, proc in self.workers.items():
            if proc.poll() is not None:
                continue
            path = self.state / f"{node}.dialogs.json"
            try:
                written = path.stat().st_mtime
                pending = json.loads(path.read_text())["pending"]
            except (OSError, ValueError, KeyError):
                return False
            if written < since or pending:
                return False
        return True

    def wait_drained(self) -> None:
        """The nodes' breakers probe the store and drain their queues."""
        back = time.time()
        assert wait_for(lambda: self.drained(back), 30), "the nodes kept operations queued"

    def reconcile_all(self) -> dict[str, int]:
        added = removed = 0
        for node in self.workers:
            path = self.state / f"{node}.dialogs.json"
            if not path.exists() or self.workers[node].poll() is not None:
                continue
            listed_at = self.store.now_ms() - 1500  # the file is at most a second old
            d = json.loads(path.read_text())
            dialogs = [ProxyDialog(Call.from_json(x["call_id"], x["from_tag"], x["call"]),
                                   x["confirmed"], True) for x in d["dialogs"]]
            r = reconcile(self.engine.policy, self.engine.store, node, dialogs,
                          listed_at_ms=listed_at)
            added += len(r.added)
            removed += len(r.removed)
        return {"reconcile_added": added, "reconcile_removed": removed}

    def redis_restart(self) -> None:
        t, before = self.now(), self.tallies()
        self.redis.kill()
        time.sleep(3)
        self.redis.start()
        outage = 3 + self.wait_redis()
        self.wait_drained()
        rec = self.reconcile_all()
        after = self.tallies()
        self.windows.append((t, self.now() + MAX_HOLD + 2))
        self.faults.append({"fault": "redis killed -9, restarted empty, reconciled", "at_s": t,
                            "outage_s": round(outage, 2),
                            "fallback_decisions": after.get("fallback", 0)
                            - before.get("fallback", 0), **rec})

    def redis_pause(self, seconds: float = 2.0) -> None:
        t, before = self.now(), self.tallies()
        self.redis.signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.redis.signal(signal.SIGCONT)
        back = self.wait_redis()
        self.wait_drained()
        after = self.tallies()
        self.windows.append((t, self.now() + MAX_HOLD + 2))
        self.faults.append({"fault": f"redis paused (SIGSTOP) {seconds:g}s", "at_s": t,
                            "outage_s": round(seconds + back, 2),
                            "fallback_decisions": after.get("fallback", 0)
                            - before.get("fallback", 0)})

    def proxy_kill(self, node: str) -> None:
        t = self.now()
        proc = self.workers[node]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = len(self.store.node_dialogs(node))
        start = time.monotonic()
        wait_for(lambda: not self.store.node_dialogs(node), 60, interval=0.2)
        gone_after = time.monotonic() - start
        assert not self.store.node_dialogs(node), "a lost node's dialogs never stopped counting"
        self.faults.append({"fault": f"node {node} killed -9, restarted later", "at_s": t,
                            "dialogs_of_killed_node": left,
                            "stopped_counting_after_s": round(gone_after, 2),
                            "lease_s": self.policy.nodes.lease_ms / 1000})
        self.start_worker(node)

    def stop(self) -> None:
        self._stop_sampling.set()
        for p in self.workers.values():
            if p.poll() is None:
                p.kill()
        self.redis.stop()


@pytest.mark.slow
def test_soak_with_faults(tmp_path: Path) -> None:
    soak = Soak(tmp_path)
    sampler = threading.Thread(target=soak.sample_forever, daemon=True)
    try:
        for node in ("node-a", "node-b", "node-c"):
            soak.start_worker(node)
        sampler.start()
        schedule = [(0.12, soak.redis_restart), (0.32, lambda: soak.proxy_kill("node-b")),
                    (0.55, soak.redis_pause), (0.75, soak.redis_restart)]
        for frac, fault in schedule:
            while soak.now() < frac * SECONDS:
                time.sleep(0.1)
            fault()
        while soak.now() < SECONDS:
            time.sleep(0.2)
        (soak.state / "stop").write_text("")
        for node, p in soak.workers.items():
            assert p.wait(timeout=60) == 0, f"{node} failed"
        finals = {n: json.loads((soak.state / f"{n}.final.json").read_text())
                  for n in soak.workers}
        assert all(f["pending"] == 0 for f in finals.values()), finals
        # once deadlines and leases have passed, every count is back at zero
        wait_for(lambda: not soak.store.stats()["active"], 40, interval=0.5)
        stats = soak.store.stats()
        sizes = {p.name: soak.store.profile_size(p.name) for p in soak.policy.profiles
                 if not p.valued}
        sizes.update({p.name: sum(soak.store.profile_values(p.name).values())
                      for p in soak.policy.profiles if p.valued})
        soak._stop_sampling.set()
        sampler.join(timeout=5)

        def in_window(t: float) -> bool:
            return any(a <= t <= b for a, b in soak.windows)

        over = [(round(t, 1), o, i) for t, o, i, down in soak.samples
                if not down and not in_window(t)
                and (o > TOTAL_ORDINARY_MAX or i > INTERNATIONAL_MAX)]
        over_in_faults = [(round(t, 1), o, i) for t, o, i, down in soak.samples
                          if not down and in_window(t)
                          and (o > TOTAL_ORDINARY_MAX or i > INTERNATIONAL_MAX)]
        tally: dict[str, int] = {}
        for f in finals.values():
            for k, v in f["tally"].items():
                tally[k] = tally.get(k, 0) + v
        report = {
            "seconds": SECONDS, "nodes": sorted(soak.workers), "decisions": tally,
            "faults": soak.faults, "samples": len(soak.samples),
            "over_limit_samples_outside_faults": len(over),
            "over_limit_samples_in_fault_windows": len(over_in_faults),
            "max_ordinary_in_fault_windows": max([o for _, o, _ in over_in_faults] or [0]),
            "final_stats": stats, "final_sizes": sizes,
        }
        print(json.dumps(report, indent=2))
        if os.environ.get("POLICER_SOAK_REPORT"):
            Path(os.environ["POLICER_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
        assert stats["active"] == 0 and all(v == 0 for v in sizes.values()), report
        assert over == [], report
        assert tally["admitted"] > 0 and tally["rejected"] > 0 and tally["fallback"] > 0
    finally:
        soak.stop()
