"""The fault-injection run, in its quick mode: every fault, one job each, none lost or run twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"
FAULTS = {
    "worker_sigkill",
    "redis_restart",
    "storage_outage",
    "webhook_failing_then_hanging",
    "worker_stalled_past_lease",
}


def test_quick_chaos_run_loses_nothing_and_runs_nothing_twice() -> None:
    done = subprocess.run(
        [sys.executable, str(CHAOS), "--quick"], capture_output=True, text=True, timeout=400
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = {
        cells[1].strip(): cells[2:7]
        for cells in (line.split("|") for line in done.stdout.splitlines())
        if len(cells) > 7 and cells[1].strip() in FAULTS
    }
    assert set(rows) == set(FAULTS), output
    for fault, cells in rows.items():
        submitted, succeeded, failed, lost, twice = (int(c) for c in cells)
        assert (submitted, lost, twice) == (1, 0, 0), fault
        assert succeeded + failed == 1, fault
    assert "total lost 0, run twice 0" in done.stdout
