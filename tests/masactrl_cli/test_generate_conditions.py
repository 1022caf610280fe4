"""``masactrl synthesize``/``edit`` with a layout condition: run.json, anchoring, misuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from masactrl_cli.main import main

STEPS = 3


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("condition") / "controlnet"
    argv = ["tiny-model", str(out), "--condition", "controlnet", "--base"]
    assert main([*argv, str(tiny_checkpoint)]) == 0
    return out


@pytest.fixture(scope="module")
def sdxl_controlnet(tiny_sdxl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("condition-xl") / "controlnet"
    argv = ["tiny-model", str(out), "--condition", "controlnet", "--base"]
    assert main([*argv, str(tiny_sdxl_checkpoint)]) == 0
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 4, y * 4, 255 if 20 < x < 44 else 0) for y in range(64) for x in range(64)])
    image.save(path)
    return path


def _stderr_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    return lines[0]


def test_edit_with_a_canny_condition_and_anchoring_records_both(
    tiny_checkpoint: Path, controlnet: Path, photo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["edit", "--model", str(tiny_checkpoint), "--image", str(photo)]
    argv += ["--target-prompt", "a dog", "--target-prompt", "a cat", "--steps", str(STEPS)]
    argv += ["--start-step", "1", "--width", "64", "--height", "64", "--quiet"]
    argv += ["--condition-model", str(controlnet), "--condition-image", str(photo)]
    argv += ["--condition-preprocess", "canny", "--canny-low", "50", "--canny-high", "150"]
    argv += ["--condition-end", "0.5", "--anchor-source", "--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["anchor_source"] is True
    assert run["condition"] == {
        "model": str(controlnet),
        "images": [str(photo)],
        "source_image": None,
        "scale": 1.0,
        "start": 0.0,
        "end": 0.5,
        "preprocess": "canny",
        "canny_low": 50,
        "canny_high": 150,
    }
    # The window [0, 0.5] of 3 steps keeps step 0 only; the ControlNet runs on the 2 targets'
    # rows of both guidance halves there.
    assert run["condition_evals"] == 1 * 2 * 2
    assert len(run["outputs"]["targets"]) == 2


def test_synthesis_with_a_source_condition_image(
    tiny_checkpoint: Path, controlnet: Path, photo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["synthesize", "--model", str(tiny_checkpoint), "--source-prompt", "a cat"]
    argv += ["--target-prompt", "a dog", "--steps", str(STEPS), "--width", "64", "--height", "64"]
    argv += ["--condition-model", str(controlnet), "--condition-image", str(photo)]
    argv += ["--source-condition-image", str(photo), "--condition-scale", "0.5", "--quiet"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["condition"]["source_image"] == str(photo)
    assert run["condition"]["scale"] == 0.5
    # Source and target rows, both guidance halves, every step.
    assert run["condition_evals"] == STEPS * 2 * 2
    assert "anchor_source" not in run


def _bad_inputs(
    tmp: Path, model: Path, xl_controlnet: Path, controlnet: Path, photo: Path
) -> dict[str, list[str]]:
    (tmp / "notes.txt").write_text("not an image")
    out = ["--steps", str(STEPS), "--width", "64", "--height", "64", "--out", str(tmp / "o")]
    synth = ["synthesize", "--model", str(model), "--source-prompt", "a cat"]
    synth += ["--target-prompt", "a dog", "--target-prompt", "a fox", "--target-prompt", "a cow"]
    synth += out
    edit = ["edit", "--model", str(model), "--image", str(photo), "--target-prompt", "a dog", *out]
    cond = ["--condition-model", str(controlnet), "--condition-image", str(photo)]
    return {
        "two images for three targets": [*synth, *cond, "--condition-image", str(photo)],
        "unreadable condition image": [
            *synth,
            "--condition-model",
            str(controlnet),
            "--condition-image",
            str(tmp / "notes.txt"),
        ],
        "missing condition image": [
            *synth,
            "--condition-model",
            str(controlnet),
            "--condition-image",
            str(tmp / "absent.png"),
        ],
        "source condition image on edit": [*edit, *cond, "--source-condition-image", str(photo)],
        "condition image without a model": [*synth, "--condition-image", str(photo)],
        "condition scale without a model": [*edit, "--condition-scale", "0.5"],
        "anchor is fine but preprocess needs a model": [
            *edit,
            "--anchor-source",
            "--condition-preprocess",
            "canny",
        ],
        "model without an image": [*synth, "--condition-model", str(controlnet)],
        "family mismatch": [
            *synth,
            "--condition-model",
            str(xl_controlnet),
            "--condition-image",
            str(photo),
        ],
        "not a condition model": [
            *synth,
            "--condition-model",
            str(model / "unet"),
            "--condition-image",
            str(photo),
        ],
        "missing condition model folder": [
            *synth,
            "--condition-model",
            str(tmp / "nowhere" / "controlnet"),
            "--condition-image",
            str(photo),
        ],
        "start equals end": [*synth, *cond, "--condition-start", "0.5", "--condition-end", "0.5"],
        "start after end": [*synth, *cond, "--condition-start", "0.8", "--condition-end", "0.2"],
        "start below 0": [*synth, *cond, "--condition-start", "-0.1"],
        "end above 1": [*synth, *cond, "--condition-end", "1.5"],
        "unknown preprocess": [*synth, *cond, "--condition-preprocess", "depth"],
        "canny thresholds without canny": [*synth, *cond, "--canny-low", "10"],
        "canny low above high": [
            *synth,
            *cond,
            "--condition-preprocess",
            "canny",
            "--canny-low",
            "200",
            "--canny-high",
            "100",
        ],
    }


CASES = [
    ("two images for three targets", "one condition image per target prompt (3) or one"),
    ("unreadable condition image", "is not an image file"),
    ("missing condition image", "does not exist"),
    ("source condition image on edit", "--source-condition-image applies only to synthesize"),
    ("condition image without a model", "--condition-image needs --condition-model"),
    ("condition scale without a model", "--condition-scale needs --condition-model"),
    ("anchor is fine but preprocess needs a model", "--condition-preprocess needs"),
    ("model without an image", "needs at least one --condition-image"),
    ("family mismatch", "made for sdxl models, but the base model is sd"),
    ("not a condition model", "not a ControlNetModel or T2IAdapter"),
    ("missing condition model folder", "controlnet: no such folder or file"),
    ("start equals end", "start must be less than end"),
    ("start after end", "start must be less than end"),
    ("start below 0", "--condition-start: condition start must be within [0, 1]"),
    ("end above 1", "--condition-end: condition end must be within [0, 1]"),
    ("unknown preprocess", "invalid choice"),
    ("canny thresholds without canny", "apply only to --condition-preprocess canny"),
    ("canny low above high", "must not exceed --canny-high"),
]


@pytest.mark.parametrize(("case", "message"), CASES)
def test_condition_misuse_is_one_line_and_exit_2(
    case: str,
    message: str,
    tiny_checkpoint: Path,
    sdxl_controlnet: Path,
    controlnet: Path,
    photo: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = _bad_inputs(tmp_path, tiny_checkpoint, sdxl_controlnet, controlnet, photo)[case]
    assert main(argv) == 2
    line = _stderr_line(capfd.readouterr().err)
    assert line.startswith(f"masactrl {argv[0]}: error: ")
    assert message in line
    assert not (tmp_path / "o" / "run.json").exists()
