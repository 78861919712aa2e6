"""Running the real ``policer`` command line in a subprocess, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "example.yaml"


def policy_copy(tmp_path: Path, namespace: str, source: Path = EXAMPLE,
                replace: dict[str, str] | None = None) -> Path:
    """A copy of a policy file with its namespace (and any text in ``replace``) changed."""
    text = source.read_text()
    lines = [f"namespace: {namespace}" if ln.startswith("namespace:") else ln
             for ln in text.splitlines()]
    text = "\n".join(lines) + "\n"
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{namespace}.yaml"
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["POLICER_LOG_FORMAT"] = "json"
    full_env["POLICER_LOG_LEVEL"] = "info"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "policer", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"policer {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def cli_json(*args: str, env: dict[str, str] | None = None) -> Any:
    proc = run_cli(*args, "--json", env=env)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def log_events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines of a run (other lines ignored)."""
    out = []
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
