"""The Prometheus alerting rules and configurations of ``deploy/prometheus``: the rules
and the configurations load in Prometheus and Alertmanager as they are (an operator who
copies them gets no error at start), and every alert fires when it should, with the
labels and annotations the on-call sees, and stays quiet otherwise
(``alerts_test.yml``, run by ``promtool test rules``).

promtool and amtool come with Debian's ``prometheus`` and ``prometheus-alertmanager``
packages, which ``bin/setup`` installs: a machine without them fails here rather than
skip, so that CI never passes without checking the rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
TIMEOUT_S = 120

#: (what a user would notice if it failed, the command, relative to DEPLOY)
CHECKS = [
    ("the alerting rules load", ["promtool", "check", "rules", "alerts.yml"]),
    ("prometheus.yml and the rule files it names load",
     ["promtool", "check", "config", "prometheus.yml"]),
    ("every alert fires, with its labels and annotations, only when it should",
     ["promtool", "test", "rules", "alerts_test.yml"]),
    ("alertmanager.yml loads", ["amtool", "check-config", "alertmanager.yml"]),
]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        package = "prometheus-alertmanager" if name == "amtool" else "prometheus"
        pytest.fail(f"{name} is not installed: run `bash bin/setup` (it installs Debian's "
                    f"{package} package; CI gets it the same way)", pytrace=False)
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool(argv[0]), *argv[1:]], cwd=DEPLOY, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)


@pytest.mark.parametrize(("what", "argv"), CHECKS, ids=[" ".join(c[1][:3]) for c in CHECKS])
def test_the_alerting_files_pass_their_tool(what: str, argv: list[str]) -> None:
    """promtool/amtool accept the file: otherwise Prometheus or Alertmanager would
    refuse to start with it, or an alert would not fire (or would fire) as its test
    case says."""
    done = _run(argv)
    assert done.returncode == 0, (
        f"{what}: `{' '.join(argv)}` (in {DEPLOY}) exited {done.returncode}\n"
        f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")


def test_every_alert_has_a_test_case() -> None:
    """No alert of alerts.yml goes untested: a new alert without a case in
    alerts_test.yml fails here."""
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert len(alerts) >= 9
    assert alerts - firing == set(), f"alerts with no case where they fire: {alerts - firing}"
    assert alerts - quiet == set(), f"alerts with no case where they stay quiet: {alerts - quiet}"
    assert firing | quiet <= alerts, f"cases of unknown alerts: {(firing | quiet) - alerts}"


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    """Each alert waits (``for``), has a severity Alertmanager can route on, and a
    summary and a description for the on-call."""
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    assert [g["name"] for g in rules["groups"]] == ["policer"]
    for rule in rules["groups"][0]["rules"]:
        name = rule["alert"]
        assert "for" in rule, f"{name}: no for:"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
