"""``masactrl synthesize|edit|sequence --model <tiny FLUX>``: the same flags as on SD, the
evaluation counts of a guidance-distilled model (rows 1+N, no unconditional rows), and exit 2
with one line for what FLUX.1 does not offer (layout conditions, sequences, a negative prompt)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from masactrl_cli.main import main

STEPS = 3
SIZE = ["--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 4, y * 4, 255 if 20 < x < 44 else 0) for y in range(64) for x in range(64)])
    image.save(path)
    return path


def _run(argv: list[str], out: Path) -> dict[str, Any]:
    assert main([*argv, *SIZE, "--steps", str(STEPS), "--quiet", "--out", str(out)]) == 0
    run: dict[str, Any] = json.loads((out / "run.json").read_text())
    return run


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _stderr_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    return lines[0]


def test_synthesize_runs_one_row_per_image_and_the_control_moves_the_targets(
    tiny_flux_checkpoint: Path, tmp_path: Path
) -> None:
    argv = ["synthesize", "--model", str(tiny_flux_checkpoint), "--source-prompt", "a cat"]
    argv += ["--target-prompt", "a dog", "--target-prompt", "a red car", "--seed", "3"]
    argv += ["--guidance", "3.5"]
    run = _run([*argv, "--start-step", "0"], tmp_path / "on")
    assert (run["family"], run["block_count"], run["guidance_scale"]) == ("flux", 4, 3.5)
    # Guidance-distilled: the source and the 2 targets, one row each, per step.
    assert run["unet_image_evals"] == STEPS * (1 + 2)
    # The family's default start layer: the first single-stream block (2 double-stream blocks).
    assert run["start_layer"] == 2
    off = _run([*argv, "--no-control"], tmp_path / "off")
    assert np.array_equal(_pixels(tmp_path / "on/source.png"), _pixels(tmp_path / "off/source.png"))
    # The random tiny model barely listens to prompts, so the control moves little in pixels
    # (mmdit-core's engine tests measure it in latents); here it must move something.
    on_target, off_target = (_pixels(tmp_path / f"{d}/target_0.png") for d in ("on", "off"))
    assert not np.array_equal(on_target, off_target)
    assert off["unet_image_evals"] == STEPS * 3


def test_edit_inverts_with_one_row_and_edits_with_two(
    tiny_flux_checkpoint: Path, photo: Path, tmp_path: Path
) -> None:
    argv = ["edit", "--model", str(tiny_flux_checkpoint), "--image", str(photo)]
    argv += ["--source-prompt", "a photo", "--target-prompt", "a photo of a dog", "--seed", "1"]
    run = _run(argv, tmp_path / "out")
    assert run["command"] == "edit" and run["family"] == "flux"
    # S inversion images, then 2 per step for the source and the one target: S + 2S.
    assert run["unet_image_evals"] == STEPS + 2 * STEPS
    assert run["timings"]["inversion_seconds"] > 0
    assert (tmp_path / "out/target_0.png").is_file()


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--negative-prompt", "blurry"], "--negative-prompt"),
        (["--condition-model", "{condition}", "--condition-image", "{photo}"], "--condition-model"),
    ],
    ids=["negative-prompt", "condition"],
)
def test_what_flux_lacks_is_exit_2_with_one_line(
    tiny_flux_checkpoint: Path,
    photo: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    extra: list[str],
    flag: str,
) -> None:
    condition = tmp_path / "controlnet"
    condition.mkdir()
    (condition / "config.json").write_text("{}")  # refused before it would be loaded
    extra = [a.format(condition=condition, photo=photo) for a in extra]
    argv = ["synthesize", "--model", str(tiny_flux_checkpoint), "--source-prompt", "a cat"]
    argv += ["--target-prompt", "a dog", *extra, *SIZE, "--steps", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    line = _stderr_line(capfd.readouterr().err)
    assert line.startswith(f"masactrl synthesize: error: {flag}: "), line
    assert "flux model" in line
    assert not (tmp_path / "out/run.json").exists()


def test_a_sequence_on_flux_is_exit_2_at_the_model(
    tiny_flux_checkpoint: Path, photo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    condition = tmp_path / "controlnet"
    condition.mkdir()
    (condition / "config.json").write_text("{}")
    argv = ["sequence", "--model", str(tiny_flux_checkpoint), "--source-prompt", "a dancer"]
    argv += ["--target-prompt", "a dancer", "--condition-model", str(condition)]
    argv += ["--frame", str(photo), "--frame", str(photo), *SIZE, "--steps", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    line = _stderr_line(capfd.readouterr().err)
    assert line.startswith("masactrl sequence: error: --model: "), line
    assert "sequences are not available on FLUX.1" in line
