"""The fault matrix's short run (``lab/chaos.py``, issue 15 item 4): the native flavour
under load (two proxies, 30 calls/s each held 1.5 s, emergency calls throughout), Redis
paused for 1 s, then killed and started empty. After each fault: no ghost at the row's
end, no profile over its max while Redis answered, every emergency call admitted, and
the count equal to the live calls within the issue's bounds (2 s after the pause, 5 s
after the empty restart). The whole matrix: ``python -m lab.chaos`` (docs/reliability.md
"Fault matrix")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab import chaos

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_paused_and_an_empty_redis_under_load(tmp_path: Path) -> None:
    opts = chaos.Options(flavour="native", faults=["pause-1", "restart-empty"], rate=30,
                         warmup_s=3, recovery_s=6.5, emergency_hold_s=7, workdir=tmp_path,
                         keep=True, verbose=False)
    missing = chaos.missing_tools(opts)
    if missing:
        why = f"the fault matrix needs {', '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    result = chaos.run_flavour(opts)
    report = chaos.report(result)
    assert not result.errors, report
    assert [r.fault for r in result.rows] == ["pause-1", "restart-empty"], report
    for row in result.rows:
        assert row.samples_redis_answered > 20, report
        assert row.ghosts["end"] == 0 and row.uncounted["end"] == 0, report
        assert row.over_live == 0 and row.over_redis == 0, report
        assert row.emergency_placed > 0, report
        assert row.emergency_admitted == row.emergency_placed, report
        assert row.emergency_counted_after == row.emergency_up_after, report
        assert row.count_equals_live_after_s is not None, report
        assert row.count_equals_live_after_s <= row.target_s, report
        assert row.invites > 100 and row.answered > 0 and row.rejected_by_limit > 0, report
    assert [r.target_s for r in result.rows] == [2, 5]
    final = result.final["single"]
    assert final["ghosts"] == 0 and final["uncounted"] == 0 and final["redis_count"] == 0, report
    assert final["emergency_not_admitted"] == [], report
