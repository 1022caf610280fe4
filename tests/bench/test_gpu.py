"""bench/gpu.py runs end to end at tiny sizes on the CPU, so the GPU run is known to work before a
GPU is lent: both families, the three runs, and the UNet costs the engine promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
STEPS = 3  # the control starts on the last step (min(4, steps - 1))
TARGETS = 4  # the synthesis's targets; the edit has one


def expected_evals(family: str, steps: int) -> dict[str, int]:
    """UNet image-evaluations per run, from docs/engine.md ("Shortcuts").

    Plain generation: 2 per step (guidance). The edit's inversion is unguided: 1 per step. Its
    denoising shares the source row between both guidance halves when the source's conditioning
    equals the unconditional one: SD's empty source prompt is encoded exactly like the empty
    negative prompt (1 + 2N per step); SDXL zeroes the empty negative prompt, so its source row is
    not shared (2 + 2N). The synthesis's source prompt names a cat: 2 + 2K per step.
    """
    shared_source = family == "sd"
    edit_per_step = (1 if shared_source else 2) + 2 * 1
    return {
        "plain": 2 * steps,
        "edit": steps + edit_per_step * steps,
        "synthesis": (2 + 2 * TARGETS) * steps,
    }


@pytest.mark.slow
def test_tiny_run_records_both_families_their_costs_and_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--steps", str(STEPS), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "gpu.json").read_text())
    table = (out / "gpu.md").read_text()

    settings = record["settings"]
    assert (settings["tiny"], settings["device"], settings["dtype"]) == (True, "cpu", "float32")
    assert settings["steps"] == STEPS
    assert record["machine"]["torch"] and record["machine"]["diffusers"]
    assert set(record["families"]) == {"sd", "sdxl"}
    for family, evals in (
        ("sd", expected_evals("sd", STEPS)),
        ("sdxl", expected_evals("sdxl", STEPS)),
    ):
        result = record["families"][family]
        runs = result["runs"]
        assert set(runs) == {"plain", "edit", "synthesis"}
        assert {name: run["unet_image_evals"] for name, run in runs.items()} == evals
        # The engine's own count agrees with the hook on the UNet.
        assert runs["edit"]["engine_unet_image_evals"] == evals["edit"]
        assert runs["synthesis"]["engine_unet_image_evals"] == evals["synthesis"]
        assert [runs[name]["images"] for name in ("plain", "edit", "synthesis")] == [1, 2, 5]
        assert all(run["seconds"] > 0 for run in runs.values())
        # No CUDA, no CUDA peak: the CPU run must not invent one.
        assert all(run["peak_memory_bytes"] is None for run in runs.values())
        ratio = runs["edit"]["seconds"] / runs["plain"]["seconds"]
        assert result["edit_over_plain"] == pytest.approx(ratio)
        assert result["goal_met"] == (ratio <= 2.1)
        verdict = "met" if result["goal_met"] else "NOT MET"
        assert (
            f"{result['label']}: edit / plain generation = {ratio:.2f}x (goal <= 2.1x): {verdict}"
            in table
        )
        assert f"| {result['label']} 64x64 | MasaCtrl edit (inversion + 1 target) | 2 |" in table
    assert "| model | run | images | UNet image evals | s | s / plain |" in table
    assert table.strip() in done.stdout


def test_a_cuda_run_without_a_gpu_is_refused_in_one_line(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no CUDA device here: use --tiny, or --device cpu" in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_tiny_flux_run_counts_one_row_per_image_and_step(tmp_path: Path) -> None:
    """FLUX.1 is guidance-distilled: plain generation 1 image per step, the edit S + 2S, the
    synthesis (1 + 4) per step; the hook on the transformer and the engine agree."""
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--families", "flux", "--steps", str(STEPS)]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads((out / "gpu.json").read_text())["families"]["flux"]["runs"]
    expected = {"plain": STEPS, "edit": STEPS + 2 * STEPS, "synthesis": (1 + TARGETS) * STEPS}
    assert {name: run["unet_image_evals"] for name, run in runs.items()} == expected
    assert runs["edit"]["engine_unet_image_evals"] == expected["edit"]
    assert runs["synthesis"]["engine_unet_image_evals"] == expected["synthesis"]
    assert "(FLUX: 3.5, a model input)" in (out / "gpu.md").read_text()
