"""The fault-injection run, in its quick mode: every fault, one job each, none lost or run twice.

``redis_failover`` also counts the job the gateway accepted first after the kill (two jobs), and
says how long after the kill that was.
"""

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
    "redis_failover",
}


def test_quick_chaos_run_loses_nothing_and_runs_nothing_twice() -> None:
    done = subprocess.run(
        [sys.executable, str(CHAOS), "--quick"], capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = {
        cells[1].strip(): cells[2:8]
        for cells in (line.split("|") for line in done.stdout.splitlines())
        if len(cells) > 8 and cells[1].strip() in FAULTS
    }
    assert set(rows) == set(FAULTS), output
    for fault, cells in rows.items():
        submitted, succeeded, failed, lost, twice = (int(c) for c in cells[:5])
        expected = 2 if fault == "redis_failover" else 1
        assert (submitted, lost, twice) == (expected, 0, 0), fault
        assert succeeded + failed == expected, fault
        recovery = cells[5].strip()
        if fault == "redis_failover":
            assert float(recovery) > 0, output  # measured, whatever it is
        else:
            assert recovery == "-", fault
    assert "total lost 0, run twice 0" in done.stdout
