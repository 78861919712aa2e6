"""Metrics through real Kamailio and SIPp (issue 4): the exporter serves the
cluster-wide decision counters from Redis and the proxy's own metrics from its
PROMETHEUS_MULTIPROC_DIR, as one: decision latency per result (KEMI: measured by
the Python workers; native: measured by the cfg's SIP workers around their FCALL
and published by the timer process), and a probe (a dry-run decision the timer
process times once a second)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.redis_server import free_port
from tests.support import wait_for
from tests.support.e2e import ROOT, Lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_exporter_serves_kamailio_workers_and_cluster_counters(lab: Lab) -> None:
    lab.use_policy("basic")  # total max 3
    uas = lab.start_uas("uas.xml")
    # the native workers time each decision only when asked (the probe is always there)
    proxy = lab.start_proxy(upstream_port=uas.port, env={"POLICER_WORKER_LATENCY": "1"})
    res = lab.run_uac(proxy, [(f"m{i}", "", f"2000{i}") for i in range(5)], hold_ms=1500)
    assert len(res.answered) == 3 and res.codes() == [503, 503]
    assert lab.wait_size("total", 0) == 0

    port = free_port()
    env = {**os.environ, "POLICER_POLICY": str(lab.policy_path),
           "POLICER_REDIS_URL": lab.redis_url,
           "PROMETHEUS_MULTIPROC_DIR": str(proxy.runtime_dir / "metrics")}
    exporter = subprocess.Popen([sys.executable, "-m", "policer", "exporter", "--listen",
                                 f"127.0.0.1:{port}"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def published() -> bool:
        """The exporter answers, and the timer process (which publishes the native
        workers' counters and probes once a second) has published the 5 decisions."""
        nonlocal samples
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=2).read().decode()
        except OSError:
            return False
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body) for s in f.samples}
        decided = sum(v for (n, _), v in samples.items()
                      if n == "policer_decision_seconds_count")
        return decided == 5 and samples.get(("policer_probe_seconds_count", ()), 0) >= 1

    try:
        assert wait_for(published, 15, interval=0.2), samples
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
    # decided inside Kamailio's workers: 3 admitted, 2 rejected by total
    counts = {dict(k).get("result"): v for (n, k), v in samples.items()
              if n == "policer_decision_seconds_count"}
    assert counts.get("admitted") == 3 and counts.get("rejected") == 2
    assert samples[("policer_decisions_total", (("profile", "total"),
                                                ("result", "rejected")))] == 2
    assert samples[("policer_dialogs_ended_total", (("reason", "bye"),))] == 3
    # latencies were measured: a sum, and every decision in a finite bucket
    assert samples[("policer_decision_seconds_sum", (("result", "admitted"),))] > 0
    assert samples[("policer_decision_seconds_bucket", (("le", "1.0"), ("result", "admitted")))
                   ] == 3
    assert samples[("policer_probe_seconds_count", ())] >= 1
    assert samples[("policer_store_up", ())] == 1
