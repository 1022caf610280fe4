"""bench/ablation.py runs end to end on the committed toy model (one cell, a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ablation.py"


def test_one_cell_writes_the_heatmaps_the_tables_and_the_numbers(tmp_path: Path) -> None:
    image, record = tmp_path / "ablation.png", tmp_path / "ablation.json"
    # Four steps: the default start step 4 is then "off", so on and off must agree exactly.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--pairs", "1", "--seeds", "1", "--steps", "4",
         "--start-steps", "0,2", "--start-layers", "10", "--image", str(image),
         "--json", str(record)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| start step | layer 10 |" in done.stdout
    assert "Coarse check over examples.json" in done.stdout
    numbers = json.loads(record.read_text())
    assert set(numbers["grid"]) == {"0,10", "2,10"}
    assert numbers["synthesis"]["on"] == numbers["synthesis"]["off"]
    assert numbers["coarse"]["tv_toy"] < numbers["coarse"]["tv_tiny"]
    assert Image.open(image).size[0] > 200
