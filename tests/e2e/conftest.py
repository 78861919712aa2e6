"""The end-to-end suite's fixtures: ``lab`` (a :class:`tests.support.e2e.Lab`,
parametrized over the two Kamailio flavours) over one private Redis per
session. The suite fails, not skips, when a tool is missing under ``CI=true``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.redis_server import RedisServer
from tests.support.e2e import FLAVOURS, Lab, missing_tools

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def e2e_redis() -> Iterator[RedisServer]:
    missing = missing_tools()
    if missing:
        why = (f"e2e needs {', '.join(missing)} (Debian packages kamailio, "
               "kamailio-python3-modules, sip-tester, redis-server)")
        if os.environ.get("CI", "").lower() == "true":  # CI must run them, not skip them
            pytest.fail(why)
        pytest.skip(why)
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=FLAVOURS)
def lab(request: pytest.FixtureRequest, e2e_redis: RedisServer, tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(str(request.param), e2e_redis.url, tmp_path)
    try:
        yield the_lab
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            sys.stderr.write(
                f"\n===== e2e diagnostics ({request.node.name})\n{the_lab.diagnostics()}\n"
            )
        the_lab.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
