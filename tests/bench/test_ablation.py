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


def test_edits_mode_chooses_on_some_scenes_and_reports_on_others(tmp_path: Path) -> None:
    record = tmp_path / "edits.json"
    # Three steps: the default start step 4 is then "off", so on and off must agree exactly.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--edits", "--steps", "3", "--choose-scenes", "0",
         "--report-scenes", "10", "--coarse-seeds", "10", "--json", str(record)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "In-place edits of random_scene(0) (choice)" in done.stdout
    assert "In-place edits of random_scene(10) (fresh, not used to choose)" in done.stdout
    assert "Coarse check over examples.json (4 pairs × seeds [10])" in done.stdout
    numbers = json.loads(record.read_text())
    assert numbers["chosen"] in {"arms", "stance", "facing"}
    for phase in ("choose", "report"):
        assert set(numbers["edits"][phase]) == {"arms", "stance", "facing", "position"}
        for effects in numbers["edits"][phase].values():
            assert effects["on"] == effects["off"]
            assert 0 < effects["on"]["to_truth"] < 1
    assert numbers["coarse"]["seeds"] == [10]


def test_coarse_only_runs_the_coarse_check_alone(tmp_path: Path) -> None:
    record = tmp_path / "coarse.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--coarse-only", "--steps", "2", "--coarse-seeds", "10",
         "--json", str(record)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "In-place edits" not in done.stdout
    assert "Coarse check over examples.json (4 pairs × seeds [10])" in done.stdout
    numbers = json.loads(record.read_text())
    assert set(numbers) == {"machine", "args", "coarse"}
    assert numbers["coarse"]["seeds"] == [10]
