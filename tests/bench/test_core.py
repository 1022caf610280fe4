"""The benchmark's re-creation of the authors' procedure computes the same edit as the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "core.py"


def test_reference_recreation_agrees_with_the_engine() -> None:
    # --check runs both procedures on tiny components; a drift in either breaks the comparison.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--check"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max |reference - ours|" in done.stdout
    assert "sequence of 2 frames" in done.stdout


@pytest.mark.slow
def test_the_flux_bench_counts_the_images_its_rows_imply() -> None:
    # The smallest run of the real width: one double-stream block, one step, one target, 64 px.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--family", "flux", "--double", "1", "--single", "0"]
        + ["--size", "64", "--steps", "1", "--targets", "1", "--max-sequence-length", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| transformer images | 3 | 3 | 1.00x |" in done.stdout
    # One step, one target: the inversion's 1 image, then the source and the target.
    assert "expected images: ours 3, loop 3; measured 3, 3 (agree)" in done.stdout
