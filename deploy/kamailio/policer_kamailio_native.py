"""app_python3 script for the native flavour (deploy/kamailio/policer.cfg).

Loaded with ``modparam("app_python3", "load", ".../policer_kamailio_native.py")``.
app_python3 imports this file as a module named after it (so it must not be
called like a package it imports) before Kamailio forks and calls ``mod_init()``
once: it starts policer's node and fills the htables the cfg's fallback reads
(``policer.adapters.kamailio_native.start_native``). The only ``python_exec`` is the
timer's ``python_exec("tick")``, once a second: SIP workers run no Python.

Debian's app_python3 embeds /usr/bin/python3: policer and its dependencies come
from POLICER_PYTHON_PATH (``:``-separated, set by deploy/kamailio/run), else
from the repository this file sits in and its ``.venv``.
"""

from __future__ import annotations

import os
import sys

# this script's directory, for the shared path set-up (app_python3 loads us by path)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import policer_paths

policer_paths.add_paths()

from policer.adapters.kamailio_native import NativeHandler, start_native  # noqa: E402


def mod_init() -> NativeHandler:
    # Once per Kamailio start, before the workers fork: end this node's dialogs left
    # from an earlier run, take its lease, fill the fallback's htables (never raises).
    start_native()
    return NativeHandler()
