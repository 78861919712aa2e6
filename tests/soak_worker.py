"""One proxy node of the soak test, in its own process: it places a random call
mix through the engine (answering, hanging up, cancelling), ticks every
second like Kamailio's timer (lease, queued operations), and publishes the
dialogs it carries (what Kamailio's ``dlg.list`` would show) to a file, so
that the soak can reconcile after Redis lost its state.

    python tests/soak_worker.py NODE POLICY REDIS_URL STATE_DIR RATE SEED
"""

from __future__ import annotations

import heapq
import json
import os
import random
import sys
import time
from pathlib import Path

from policer.call import Call
from policer.engine import Engine
from policer.log import configure
from policer.policy import load_policy
from policer.store import open_store

NUMBERS = ["5551234", "0301234567", "00441632960123", "112"]
WEIGHTS = [50, 30, 18, 2]


def main() -> int:
    node, policy_path, url, state_dir, rate, seed = sys.argv[1:7]
    configure(level="critical")
    state = Path(state_dir)
    policy = load_policy(policy_path)
    engine = Engine(policy, open_store(url, policy.namespace, policy.store_timeout_ms),
                    node=node, lease=True)
    engine.start()
    rng = random.Random(int(seed))
    live: dict[str, tuple[Call, bool]] = {}
    ends: list[tuple[float, str]] = []
    tally = {"admitted": 0, "rejected": 0, "fallback": 0, "bypass": 0}
    stop_file = state / "stop"
    next_call = next_tick = time.monotonic()
    seq = 0
    while not stop_file.exists():
        now = time.monotonic()
        while ends and ends[0][0] <= now:
            _, did = heapq.heappop(ends)
            _, answered = live.pop(did)
            engine.release(did, "bye" if answered else "cancel")
        if now >= next_call:
            seq += 1
            c = Call.from_raw(f"{node}-{seed}-{seq}", "t", from_user=f"u{rng.randrange(40)}",
                              ruri_user=rng.choices(NUMBERS, WEIGHTS)[0],
                              headers={"x-account": f"acct{rng.randrange(6)}"})
            d = engine.admit(c)
            tally["fallback" if d.fallback else "admitted" if d.admitted else "rejected"] += 1
            tally["bypass"] += d.bypass
            if d.admitted:
                answered = rng.random() < 0.85
                if answered:
                    engine.confirm(d.dialog_id)
                live[d.dialog_id] = (c, answered)
                heapq.heappush(ends, (now + rng.uniform(0.5, 5.0), d.dialog_id))
            next_call += rng.expovariate(float(rate))
        if now >= next_tick:
            next_tick = now + 1.0
            engine.tick()
            tmp = state / f"{node}.dialogs.tmp"
            tmp.write_text(json.dumps({"dialogs": [
                {"call_id": c.call_id, "from_tag": c.from_tag, "call": c.to_json(),
                 "confirmed": answered} for c, answered in live.values()],
                "tally": tally, "pending": len(engine.pending)}))
            os.replace(tmp, state / f"{node}.dialogs.json")
        time.sleep(max(0.0, min(next_call, next_tick, ends[0][0] if ends else next_tick)
                       - time.monotonic()))
    for did, (_, answered) in list(live.items()):
        engine.release(did, "bye" if answered else "cancel")
    deadline = time.monotonic() + 30
    while engine.pending and time.monotonic() < deadline:
        engine.tick()
        time.sleep(0.2)
    (state / f"{node}.final.json").write_text(json.dumps({"tally": tally,
                                                          "pending": len(engine.pending)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
