"""``bench/queue.py``: the documented entry point, and no shadow over the standard library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_entry_point_runs_the_queue_policy_benchmark() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "queue.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--heavy" in result.stdout and "light tenant" in result.stdout


def test_a_benchmark_beside_it_still_gets_the_standard_librarys_queue() -> None:
    # Any script in bench/ puts the folder first on sys.path, where `import queue` looks.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import queue; "
        "q = queue.Queue(); q.put(1); print(q.get(), queue.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(BENCH)], capture_output=True, text=True, check=True
    )
    value, origin = result.stdout.split()
    assert value == "1"
    assert Path(origin).parent != BENCH
