"""A private alerting pipeline for end-to-end tests: ``policer exporter`` scraped by a
real Prometheus that evaluates the repository's alert rules
(``deploy/prometheus/alerts.yml``, unchanged) and sends its alerts to a real
Alertmanager, whose webhook posts the notifications to a small HTTP server in this
process that records them.

The configurations are generated from the ones operators copy
(``deploy/prometheus/prometheus.yml`` and ``alertmanager.yml``) with only what a test
must change: 1 s scrape and evaluation intervals, loopback ports, 1 s grouping and the
webhook's URL. Routes, grouping labels and inhibit rules stay as written.

>>> with PolicerExporter(redis_url, policy_path, workdir) as exporter:   # doctest: +SKIP
...     with AlertStack(workdir, exporter.port) as stack:
...         ...  # make policer raise a fraud event
...         alert = stack.wait_for("PolicerFraudCritical", rule="intl-sweep", timeout=60)

Every process runs in a session of its own and is stopped whole
(:func:`lab.processes.stop_group`), also when a start fails half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from lab.processes import stop_group, wait_for
from lab.redis_server import free_port

__all__ = [
    "ALERTMANAGER_YML",
    "ALERTS_YML",
    "DEPLOY",
    "PROMETHEUS_YML",
    "Alert",
    "AlertStack",
    "AlertingError",
    "Alertmanager",
    "PolicerExporter",
    "Prometheus",
    "WebhookReceiver",
    "alertmanager_config",
    "find_alertmanager",
    "find_prometheus",
    "prometheus_config",
]

ROOT = Path(__file__).resolve().parent.parent
#: the configurations operators copy
DEPLOY = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager.yml"
ALERTS_YML = DEPLOY / "alerts.yml"

#: how many times a process is started again when its port was taken meanwhile
_PORT_ATTEMPTS = 3


class AlertingError(RuntimeError):
    """A process of the pipeline could not be started, or a generated configuration
    could not be made from its source."""


def _find(names: Sequence[str]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        candidate = f"/usr/bin/{name}"
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_prometheus() -> str | None:
    """Path of the ``prometheus`` server binary (Debian's ``prometheus``), or None."""
    return _find(("prometheus",))


def find_alertmanager() -> str | None:
    """Path of Alertmanager (Debian names it ``prometheus-alertmanager``), or None."""
    return _find(("prometheus-alertmanager", "alertmanager"))


# ----------------------------------------------------------------------------- HTTP


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())
    except OSError:
        return 0, b""


def _get_json(url: str, timeout: float = 5.0) -> Any:
    status, body = _get(url, timeout)
    if status != 200:
        raise AlertingError(f"GET {url}: HTTP {status} {body[:200]!r}")
    return json.loads(body)


def _safely(describe: Callable[[], str]) -> str:
    """``describe()``, or why it failed (diagnostics must not raise)."""
    try:
        return describe()
    except (AlertingError, OSError, ValueError, KeyError, TypeError) as e:
        return f"unavailable ({e})"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- configs


def _duration(seconds: float) -> str:
    """A Prometheus duration: ``1s``, ``500ms``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"a duration must be positive, got {seconds}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _load_mapping(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise AlertingError(f"{path}: expected a mapping at the top")
    return data


def prometheus_config(targets: Sequence[str], alertmanagers: Sequence[str], *,
                      source: Path = PROMETHEUS_YML, rule_files: Sequence[Path] | None = None,
                      interval: float = 1.0, job: str = "policer") -> dict[str, Any]:
    """``source`` (deploy/prometheus/prometheus.yml) for a test: scrape and evaluation
    every ``interval`` seconds, job ``job`` scraping ``targets`` (``host:port``), alerts
    sent to ``alertmanagers``, and ``rule_files`` (default: the source's own, as absolute
    paths, since they are relative to the source)."""
    config = _load_mapping(source)
    every = _duration(interval)
    glob = config.setdefault("global", {})
    glob.update(scrape_interval=every, evaluation_interval=every, scrape_timeout=every)
    if rule_files is None:
        rule_files = [source.parent / str(p) for p in config.get("rule_files") or []]
    config["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    config["alerting"] = {"alertmanagers": [
        {"static_configs": [{"targets": list(alertmanagers)}]}]}
    jobs = [j for j in config.get("scrape_configs") or [] if j.get("job_name") == job]
    if len(jobs) != 1:
        raise AlertingError(f"{source}: expected one scrape job named {job!r}, "
                            f"found {len(jobs)}")
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    jobs[0].pop("scrape_interval", None)
    jobs[0].pop("scrape_timeout", None)
    return config


def alertmanager_config(webhook_url: str, *, source: Path = ALERTMANAGER_YML,
                        group_wait: float = 1.0, group_interval: float = 1.0,
                        repeat_interval: float = 3600.0) -> dict[str, Any]:
    """``source`` (deploy/prometheus/alertmanager.yml) for a test: every webhook of every
    receiver posts to ``webhook_url``, and the route (and its sub-routes) group and
    notify within seconds. Receivers, grouping labels and inhibit rules stay as written;
    a receiver with no webhook (e-mail, PagerDuty...) is an error, not silently kept."""
    config = _load_mapping(source)
    timings = {"group_wait": _duration(group_wait), "group_interval": _duration(group_interval),
               "repeat_interval": _duration(repeat_interval)}

    def shorten(route: dict[str, Any]) -> None:
        for k, v in timings.items():
            if k in route or route is config.get("route"):
                route[k] = v
        for sub in route.get("routes") or []:
            shorten(sub)

    route = config.get("route")
    if not isinstance(route, dict):
        raise AlertingError(f"{source}: no route")
    shorten(route)
    for receiver in config.get("receivers") or []:
        others = sorted(k for k in receiver if k.endswith("_configs") and k != "webhook_configs")
        if others:
            raise AlertingError(f"{source}: receiver {receiver.get('name')!r} has "
                                f"{', '.join(others)}: a test can only receive webhooks")
        for hook in receiver.get("webhook_configs") or []:
            hook["url"] = webhook_url
    return config


# ----------------------------------------------------------------------------- webhook


@dataclass(frozen=True)
class Alert:
    """One alert of an Alertmanager webhook notification."""

    status: str  # firing | resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: str = ""
    ends_at: str = ""
    #: the receiver the notification went to
    receiver: str = ""
    #: when this process received it (time.monotonic())
    received: float = 0.0

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    def matches(self, alertname: str | None = None, status: str | None = None,
                **labels: str) -> bool:
        """Whether this alert has that name, status and every one of ``labels``."""
        if alertname is not None and self.name != alertname:
            return False
        if status is not None and self.status != status:
            return False
        return all(self.labels.get(k) == v for k, v in labels.items())


class WebhookReceiver:
    """An HTTP server on a loopback port, in a thread, that records what Alertmanager's
    webhook posts (``POST /alerts``, JSON) and answers 200."""

    path = "/alerts"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._lock = threading.Lock()
        self._notifications: list[tuple[float, dict[str, Any]]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise AlertingError("the webhook receiver is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> Self:
        """Listen (on a port the system picks: no race with other tests) and serve."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"invalid": body.decode(errors="replace")}
                receiver._record(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="alert-webhook", daemon=True)
        self._thread.start()
        return self

    def _record(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self._notifications.append((time.monotonic(), payload))

    def notifications(self) -> list[dict[str, Any]]:
        """Every notification received so far (Alertmanager's webhook JSON), in order."""
        with self._lock:
            return [n for _, n in self._notifications]

    def alerts(self) -> list[Alert]:
        """The alerts of every notification received so far, in order (an alert that
        Alertmanager notified several times comes several times)."""
        with self._lock:
            got = list(self._notifications)
        out = []
        for at, n in got:
            for a in n.get("alerts") or []:
                out.append(Alert(
                    status=str(a.get("status", "")), labels=dict(a.get("labels") or {}),
                    annotations=dict(a.get("annotations") or {}),
                    starts_at=str(a.get("startsAt", "")), ends_at=str(a.get("endsAt", "")),
                    receiver=str(n.get("receiver", "")), received=at))
        return out

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ----------------------------------------------------------------------------- processes


class _Process:
    """A server process on a free loopback TCP port, ready when ``GET ready_path`` answers
    200; its output goes to ``<workdir>/<name>.log``."""

    name = "process"
    ready_path = "/-/ready"

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def prepare(self) -> None:
        """Write what the command needs (configuration, directories) for ``self.port``."""

    def start(self, timeout: float = 30.0) -> Self:
        """Start on a free port and wait until ready; started again on another port when
        the one picked was taken meanwhile."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            self.port = free_port(self.host)
            self.prepare()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env(),
                    start_new_session=True)
            ready = wait_for(lambda: self._exited() or
                          _get(self.url + self.ready_path)[0] == 200, timeout)
            if ready and not self._exited():
                return self
            tail = _tail(self.log_path)
            self.close()
            if "address already in use" in tail and attempt + 1 < _PORT_ATTEMPTS:
                continue
            why = "exited" if ready else f"was not ready within {timeout}s"
            raise AlertingError(f"{self.name} {why}: {self.command()}\n{tail}")
        raise AssertionError("unreachable")

    def _exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log_path, lines)

    def close(self) -> None:
        """Stop the process (and its group); idempotent."""
        stop_group(self.process)
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PolicerExporter(_Process):
    """``policer exporter`` (this checkout's, ``python -m policer``) for a Redis and a
    policy file, on a free loopback port; ``extra_args``: e.g. ``["--values", "user=bob"]``;
    ``env``: more environment (``PROMETHEUS_MULTIPROC_DIR`` for workers' metrics)."""

    name = "exporter"
    ready_path = "/metrics"

    def __init__(self, redis_url: str, policy: Path, workdir: Path, *,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        super().__init__(workdir, host)
        self.redis_url = redis_url
        self.policy = Path(policy)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})

    def command(self) -> list[str]:
        return [sys.executable, "-m", "policer", "exporter", "--listen", self.address,
                *self.extra_args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("POLICER_LOG_LEVEL", "info")
        env.update(POLICER_REDIS_URL=self.redis_url, POLICER_POLICY=str(self.policy),
                   PYTHONPATH=os.pathsep.join(
                       p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        env.update(self.extra_env)
        return env

    def metrics(self) -> str:
        """The exposition text of one scrape."""
        status, body = _get(self.url + "/metrics", timeout=5)
        if status != 200:
            raise AlertingError(f"exporter scrape: HTTP {status}")
        return body.decode()


class Prometheus(_Process):
    """A Prometheus server with a configuration from :func:`prometheus_config`, its TSDB in
    ``<workdir>/prometheus-data``."""

    name = "prometheus"

    def __init__(self, workdir: Path, targets: Sequence[str], alertmanagers: Sequence[str],
                 *, rule_files: Sequence[Path] = (ALERTS_YML,), interval: float = 1.0,
                 source: Path = PROMETHEUS_YML, binary: str | None = None,
                 host: str = "127.0.0.1") -> None:
        super().__init__(workdir, host)
        found = binary or find_prometheus()
        if found is None:
            raise AlertingError("prometheus is not installed (Debian: apt-get install "
                                "prometheus)")
        self.binary = found
        self.targets = list(targets)
        self.alertmanagers = list(alertmanagers)
        self.rule_files = list(rule_files)
        self.interval = interval
        self.source = source
        self.config_path = self.workdir / "prometheus.yml"
        self.data = self.workdir / "prometheus-data"

    def prepare(self) -> None:
        config = prometheus_config(self.targets, self.alertmanagers, source=self.source,
                                   rule_files=self.rule_files, interval=self.interval)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data}", f"--web.listen-address={self.address}",
                "--log.level=warn"]

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``'s ``data`` (raises on an error status)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = _get_json(f"{self.url}/api/v1/{path}{query}")
        if body.get("status") != "success":
            raise AlertingError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series of the result vector."""
        data = self.api("query", query=expr)
        return [(dict(r["metric"]), float(r["value"][1])) for r in data.get("result") or []]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Prometheus holds now (pending and firing), as its API gives them."""
        return list(self.api("alerts").get("alerts") or [])

    def targets_up(self) -> bool:
        """Whether every scrape target has been scraped and answered."""
        try:
            active = self.api("targets").get("activeTargets") or []
        except (AlertingError, ValueError):
            return False
        return bool(active) and all(t.get("health") == "up" for t in active)

    def alertmanagers_found(self) -> bool:
        try:
            data = self.api("alertmanagers")
        except (AlertingError, ValueError):
            return False
        return bool(data.get("activeAlertmanagers"))


class Alertmanager(_Process):
    """An Alertmanager with a configuration from :func:`alertmanager_config` (its webhooks
    to ``webhook_url``), no cluster gossip, its state in ``<workdir>/alertmanager-data``."""

    name = "alertmanager"

    def __init__(self, workdir: Path, webhook_url: str, *, group_wait: float = 1.0,
                 group_interval: float = 1.0, repeat_interval: float = 3600.0,
                 source: Path = ALERTMANAGER_YML, binary: str | None = None,
                 host: str = "127.0.0.1") -> None:
        super().__init__(workdir, host)
        found = binary or find_alertmanager()
        if found is None:
            raise AlertingError("alertmanager is not installed (Debian: apt-get install "
                                "prometheus-alertmanager)")
        self.binary = found
        self.webhook_url = webhook_url
        self.timings = (group_wait, group_interval, repeat_interval)
        self.source = source
        self.config_path = self.workdir / "alertmanager.yml"
        self.data = self.workdir / "alertmanager-data"

    def prepare(self) -> None:
        wait, interval, repeat = self.timings
        config = alertmanager_config(self.webhook_url, source=self.source, group_wait=wait,
                                     group_interval=interval, repeat_interval=repeat)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.data.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}",
                f"--storage.path={self.data}", f"--web.listen-address={self.address}",
                "--cluster.listen-address=", "--log.level=warn"]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds now (``/api/v2/alerts``: labels, and ``status``
        with ``state`` active/suppressed and ``inhibitedBy``)."""
        return list(_get_json(f"{self.url}/api/v2/alerts"))


# ----------------------------------------------------------------------------- the stack


class AlertStack:
    """Prometheus scraping the exporter(s) on ``exporter_port`` (or ``host:port``
    targets) and evaluating ``rule_files`` (default: the repository's alerts.yml),
    Alertmanager with the repository's routing, and the webhook receiver they end in.

    >>> stack = AlertStack(tmp_path, exporter.port).start()     # doctest: +SKIP
    >>> stack.wait_for("PolicerFraudBlocked", rule="intl-sweep", timeout=60)
    >>> stack.close()

    :meth:`start` returns once Prometheus has scraped every target and found
    Alertmanager (``wait_targets=False``: without waiting for the targets)."""

    def __init__(self, workdir: Path, exporter_port: int | Sequence[int | str], *,
                 rule_files: Sequence[Path] = (ALERTS_YML,), interval: float = 1.0,
                 group_wait: float = 1.0, group_interval: float = 1.0,
                 host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir) / "alerting"
        ports = [exporter_port] if isinstance(exporter_port, int) else list(exporter_port)
        self.targets = [p if isinstance(p, str) else f"{host}:{p}" for p in ports]
        self.rule_files = list(rule_files)
        self.interval = interval
        self.group = (group_wait, group_interval)
        self.host = host
        self.webhook = WebhookReceiver(host)
        self.prometheus: Prometheus | None = None
        self.alertmanager: Alertmanager | None = None

    def start(self, timeout: float = 30.0, wait_targets: bool = True) -> Self:
        """Start the receiver, Alertmanager and Prometheus (stopping what started when
        one fails)."""
        try:
            self.webhook.start()
            wait, interval = self.group
            self.alertmanager = Alertmanager(self.workdir, self.webhook.url,
                                             group_wait=wait, group_interval=interval,
                                             host=self.host).start(timeout)
            self.prometheus = Prometheus(self.workdir, self.targets,
                                         [self.alertmanager.address],
                                         rule_files=self.rule_files, interval=self.interval,
                                         host=self.host).start(timeout)
            prom = self.prometheus
            if not wait_for(prom.alertmanagers_found, timeout):
                raise AlertingError(f"prometheus found no alertmanager\n{self.diagnostics()}")
            if wait_targets and not wait_for(prom.targets_up, timeout):
                raise AlertingError(f"prometheus could not scrape {self.targets}: "
                                    f"{prom.api('targets')}\n{self.diagnostics()}")
        except BaseException:
            self.close()
            raise
        return self

    def _prom(self) -> Prometheus:
        if self.prometheus is None:
            raise AlertingError("the alert stack is not started")
        return self.prometheus

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """A PromQL instant query on the stack's Prometheus."""
        return self._prom().query(expr)

    def wait_query(self, expr: str, condition: Callable[[list[tuple[dict[str, str], float]]],
                                                        bool] = bool,
                   timeout: float = 30.0) -> list[tuple[dict[str, str], float]]:
        """Poll ``expr`` until ``condition`` holds for its result (default: any series),
        e.g. until a counter's first sample (at 0) is stored, before making it move:
        ``increase()`` sees an increase only from a sample before it."""
        result: list[tuple[dict[str, str], float]] = []

        def check() -> bool:
            nonlocal result
            result = self.query(expr)
            return bool(condition(result))

        if not wait_for(check, timeout, interval=0.2):
            raise AssertionError(f"{expr}: {result} after {timeout}s\n{self.diagnostics()}")
        return result

    def alerts(self) -> list[Alert]:
        """Every alert the webhook has received so far (see :meth:`WebhookReceiver.alerts`)."""
        return self.webhook.alerts()

    def firing(self) -> list[dict[str, Any]]:
        """The alerts firing at Prometheus now (its API's records)."""
        return [a for a in self._prom().alerts() if a.get("state") == "firing"]

    def wait_for(self, alertname: str, *, timeout: float = 60.0, status: str = "firing",
                 **labels: str) -> Alert:
        """The first alert the webhook received (or receives within ``timeout`` seconds)
        named ``alertname``, with ``status`` and every one of ``labels``; raises
        AssertionError, with what was received and the processes' logs, otherwise."""
        found: list[Alert] = []

        def check() -> bool:
            found[:] = [a for a in self.alerts() if a.matches(alertname, status, **labels)]
            return bool(found)

        if not wait_for(check, timeout, interval=0.1):
            got = [(a.name, a.status, dict(a.labels)) for a in self.alerts()]
            raise AssertionError(
                f"no {status} {alertname} {labels} within {timeout}s; received: {got}\n"
                f"{self.diagnostics()}")
        return found[0]

    def diagnostics(self) -> str:
        """What Prometheus and Alertmanager hold and logged, for a failing test."""
        parts = []
        if self.prometheus is not None:
            prom = self.prometheus
            parts.append("prometheus alerts: " + _safely(
                lambda: str([(a["labels"], a["state"]) for a in prom.alerts()])))
            parts.append(f"prometheus log:\n{prom.log_tail()}")
        if self.alertmanager is not None:
            am = self.alertmanager
            parts.append("alertmanager alerts: " + _safely(
                lambda: str([(a["labels"], a["status"]) for a in am.alerts()])))
            parts.append(f"alertmanager log:\n{am.log_tail()}")
        got = [(a.name, a.status, dict(a.labels)) for a in self.webhook.alerts()]
        parts.append(f"webhook alerts: {got}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop Prometheus, Alertmanager and the receiver; idempotent, and each is stopped
        even when stopping another failed."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.webhook.close)
            if self.alertmanager is not None:
                stack.callback(self.alertmanager.close)
            if self.prometheus is not None:
                stack.callback(self.prometheus.close)
        self.prometheus = None
        self.alertmanager = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
