"""``masactrl synthesize``/``edit`` on checkpoints shaped unlike SD 1.5: measured defaults,
explicit values that fit the model, and runs without the control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masactrl_cli.main import main
from masactrl_jobs.shape import default_start_layer

STEPS = 3
BLOCKS = {"two-level": 7, "no-mid": 9, "three-level": 11}


def synthesize(model: Path, out: Path, *extra: str) -> dict:
    argv = ["synthesize", "--model", str(model), "--source-prompt", "a photo of a cat"]
    argv += ["--target-prompt", "a photo of a dog", "--steps", str(STEPS), "--quiet"]
    argv += ["--width", "64", "--height", "64", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("variant", sorted(BLOCKS))
def test_defaults_and_explicit_values_run_on_other_depths(
    tiny_shaped_checkpoints: dict[str, Path], variant: str, tmp_path: Path
) -> None:
    model = tiny_shaped_checkpoints[variant]
    run = synthesize(model, tmp_path / "defaults")
    blocks = BLOCKS[variant]
    assert run["block_count"] == blocks
    # The default start step 4 is clipped to the 3-step run; the layer is the paper's depth.
    assert (run["start_step"], run["start_layer"]) == (STEPS, default_start_layer(blocks))
    explicit = synthesize(model, tmp_path / "explicit", "--start-step", "1", "--start-layer", "3")
    assert (explicit["start_step"], explicit["start_layer"]) == (1, 3)


def test_the_issues_command_on_a_seven_block_model(
    tiny_shaped_checkpoints: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = tiny_shaped_checkpoints["two-level"]
    argv = ["edit", "--model", str(model), "--image", str(_photo(tmp_path)), "--quiet"]
    argv += ["--target-prompt", "a photo of a dog", "--steps", str(STEPS)]
    argv += ["--start-step", "1", "--out", str(tmp_path / "edit"), "--start-layer", "3"]
    assert main(argv) == 0
    run = json.loads((tmp_path / "edit" / "run.json").read_text())
    assert (run["start_layer"], run["block_count"]) == (3, 7)
    # A layer past the model's blocks is one line naming its range.
    argv[-1] = "7"
    capfd.readouterr()
    assert main(argv) == 2
    assert "start_layer must be less than 7" in capfd.readouterr().err


def test_no_control_and_start_step_equal_to_steps_are_the_plain_model(
    tiny_shaped_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = tiny_shaped_checkpoints["two-level"]
    no_control = synthesize(model, tmp_path / "off", "--no-control")
    at_end = synthesize(model, tmp_path / "end", "--start-step", str(STEPS))
    synthesize(model, tmp_path / "on", "--start-step", "0", "--start-layer", "0")
    # 2 rows (the guidance halves) for the source and each target at every step.
    assert no_control["unet_image_evals"] == at_end["unet_image_evals"] == 2 * (1 + 1) * STEPS
    assert no_control["start_step"] == STEPS

    def pixels(folder: str) -> np.ndarray:
        with Image.open(tmp_path / folder / "target_0.png") as image:
            return np.asarray(image, dtype=np.int16)

    assert np.array_equal(pixels("off"), pixels("end"))
    # The random tiny VAE flattens latent changes; the control still moves pixels past the
    # tolerance of the equality below (engine tests measure the effect on the latents).
    assert np.abs(pixels("off") - pixels("on")).max() > 2
    pipeline = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn((1, 4, 32, 32), generator=generator)
    expected = pipeline(
        "a photo of a dog", num_inference_steps=STEPS, latents=noise, output_type="np"
    ).images[0]
    plain = np.round(expected * 255).astype(np.int16)
    assert np.abs(pixels("off") - plain).max() <= 1


def test_no_control_excludes_a_start_step(tiny_checkpoint: Path, tmp_path: Path, capfd) -> None:
    argv = ["synthesize", "--model", str(tiny_checkpoint), "--source-prompt", "a", "--no-control"]
    argv += ["--target-prompt", "b", "--start-step", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "not allowed with argument" in capfd.readouterr().err


def _photo(folder: Path) -> Path:
    path = folder / "photo.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(path)
    return path
