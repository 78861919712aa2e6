"""A Kamailio proxy as ``deploy/kamailio/run`` starts it, the way both ``bin/demo``
(:mod:`lab.demo`) and the end-to-end tests (``tests/support/e2e.py``) start one, ask it
over its control socket (``kamcmd``) and wait for it to be ready."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["DEPLOY", "KAMAILIO", "KAMCMD", "RUN", "active_dialogs", "kamcmd", "proxy_env",
           "start_proxy"]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kamailio"
RUN = DEPLOY / "run"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMCMD = shutil.which("kamcmd") or "/usr/sbin/kamcmd"


def proxy_env(*, policy: Path, redis_url: str, port: int, upstream_port: int, flavour: str,
              node: str, runtime: Path, children: int, shm_mb: int,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``deploy/kamailio/run`` reads (its header documents each)."""
    return {
        **os.environ,
        "POLICER_POLICY": str(policy),
        "POLICER_REDIS_URL": redis_url,
        "POLICER_SIP_LISTEN": f"udp:127.0.0.1:{port}",
        "POLICER_SIP_UPSTREAM": f"sip:127.0.0.1:{upstream_port}",
        "POLICER_KAMAILIO_FLAVOUR": flavour,
        "POLICER_NODE": node,
        "POLICER_KAMAILIO_CHILDREN": str(children),
        "POLICER_KAMAILIO_SHM": str(shm_mb),
        "POLICER_RUNTIME_DIR": str(runtime),
        "KAMAILIO": KAMAILIO,
        **(extra or {}),
    }


def start_proxy(env: dict[str, str], log: Path, cwd: Path | None = None
                ) -> subprocess.Popen[bytes]:
    """``deploy/kamailio/run`` in a session of its own (stop its process group), its
    output to ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen([str(RUN)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)


def kamcmd(runtime: Path, *args: str, timeout: float = 5) -> str:
    """A command on the proxy's control socket; RuntimeError when it fails."""
    out = subprocess.run([KAMCMD, "-s", f"unix:{runtime}/kamailio_ctl", *args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        detail = out.stderr.strip() or out.stdout.strip()
        raise RuntimeError(f"kamcmd {' '.join(args)}: {detail}")
    return out.stdout


def ready(runtime: Path) -> bool:
    """The proxy answers on its control socket."""
    try:
        kamcmd(runtime, "core.uptime", timeout=2)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


def active_dialogs(runtime: Path) -> int:
    """Kamailio's own count of its active dialogs (-1 when it does not say)."""
    m = re.search(r"\ball:\s*(\d+)", kamcmd(runtime, "dlg.stats_active"))
    return int(m.group(1)) if m else -1
