"""The benchmark's re-creation of the authors' procedure computes the same edit as the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "core.py"


def test_reference_recreation_agrees_with_the_engine() -> None:
    # --check runs both procedures on tiny components; a drift in either breaks the comparison.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--check"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max |reference - ours|" in done.stdout
    assert "sequence of 2 frames" in done.stdout
