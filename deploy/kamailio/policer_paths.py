"""Makes policer importable inside Kamailio's app_python3 (both flavours' scripts
import this first).

Debian's app_python3 embeds /usr/bin/python3: policer and its dependencies come
from POLICER_PYTHON_PATH (``:``-separated, set by deploy/kamailio/run), else
from the repository this file sits in and its ``.venv``.
"""

from __future__ import annotations

import glob
import os
import site
import sys


def add_paths() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    paths = [p for p in os.environ.get("POLICER_PYTHON_PATH", "").split(":") if p]
    if not paths:
        paths = [repo, *glob.glob(os.path.join(repo, ".venv", "lib", "python3*", "site-packages"))]
    for path in paths:
        if path.endswith("site-packages"):
            site.addsitedir(path)
        elif path not in sys.path:
            sys.path.insert(0, path)
