"""The fault-injection run, in its quick mode: every fault, one job each, none lost or run twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def test_quick_chaos_run_loses_nothing_and_runs_nothing_twice() -> None:
    done = subprocess.run(
        [sys.executable, str(CHAOS), "--quick"], capture_output=True, text=True, timeout=400
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = [line for line in done.stdout.splitlines() if line.startswith("| worker_")]
    rows += [line for line in done.stdout.splitlines() if line.startswith(("| redis", "| stor"))]
    rows += [line for line in done.stdout.splitlines() if line.startswith("| webhook")]
    assert len(rows) == 5, output
    for row in rows:
        submitted, succeeded, failed, lost, twice = (int(c) for c in row.split("|")[2:7])
        assert (submitted, lost, twice) == (1, 0, 0), row
        assert succeeded + failed == 1, row
    assert "total lost 0, run twice 0" in done.stdout
