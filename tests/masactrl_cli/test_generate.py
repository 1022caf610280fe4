"""``masactrl synthesize`` / ``edit`` on the tiny checkpoint: outputs, run.json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from masactrl_cli.main import main

STEPS = 3


def _stderr_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square RGB photo stand-in, so the edit path has to crop and resize."""
    path = tmp_path_factory.mktemp("images") / "photo.png"
    image = Image.new("RGB", (96, 72))
    image.putdata([(x * 2, y * 3, (x + y) % 256) for y in range(72) for x in range(96)])
    image.save(path)
    return path


def test_synthesize_writes_images_and_run_json(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["synthesize", "--model", str(tiny_checkpoint), "--source-prompt", "a photo of a cat"]
    argv += ["--target-prompt", "a photo of a dog", "--target-prompt", "a red car"]
    argv += ["--seed", "7", "--steps", str(STEPS), "--guidance", "5", "--start-step", "1"]
    argv += ["--start-layer", "8", "--width", "64", "--height", "64", "--out", str(out)]
    assert main(argv) == 0
    captured = capfd.readouterr()
    assert "denoise" in captured.err  # the progress bar is fed by the engine's callback
    assert "run.json" in captured.out

    for name in ("source.png", "target_0.png", "target_1.png"):
        with Image.open(out / name) as image:
            assert image.size == (64, 64)
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "synthesize"
    assert run["model"] == str(tiny_checkpoint)
    assert run["target_prompts"] == ["a photo of a dog", "a red car"]
    assert (run["seed"], run["steps"], run["guidance_scale"]) == (7, STEPS, 5.0)
    assert (run["start_step"], run["start_layer"], run["width"], run["height"]) == (1, 8, 64, 64)
    assert (run["device"], run["dtype"], run["block_count"]) == ("cpu", "float32", 16)
    assert run["outputs"] == {"source": "source.png", "targets": ["target_0.png", "target_1.png"]}
    assert run["warnings"] == []  # the tiny checkpoint declares no vocabulary
    assert "warning" not in captured.err
    # Source prompt differs from the negative prompt: 2 source rows + 2 per target, every step.
    assert run["unet_image_evals"] == STEPS * (2 + 2 * 2)
    assert run["timings"]["denoise_seconds"] > 0


def test_prompt_words_the_model_does_not_know_are_warned_about_and_kept_in_run_json(
    tiny_vocabulary_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["synthesize", "--model", str(tiny_vocabulary_checkpoint), "--quiet"]
    argv += ["--source-prompt", "a photo of a cat", "--target-prompt", "a photo of a dog"]
    argv += ["--target-prompt", "a house and a cat", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        "masactrl synthesize: warning: --target-prompt #2: the model does not know the words "
        "'house', 'and'; it was trained on 5 words: a, cat, dog, of, photo, so the picture may "
        "not show what the prompt asks"
    ]
    run = json.loads((out / "run.json").read_text())
    assert run["warnings"] == [warnings[0].removeprefix("masactrl synthesize: warning: ")]


def test_edit_writes_reconstruction_and_edits(
    tiny_checkpoint: Path, photo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edit"
    argv = ["edit", "--model", str(tiny_checkpoint), "--image", str(photo)]
    argv += ["--target-prompt", "a cat raising its hand", "--steps", str(STEPS)]
    argv += ["--start-step", "0", "--out", str(out)]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "invert" in err and "denoise" in err

    for name in ("source.png", "target_0.png"):
        with Image.open(out / name) as image:
            assert image.size == (64, 64)  # the model's native size when none is given
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "edit"
    assert run["source_prompt"] == "" and run["negative_prompt"] == ""
    assert run["image"]["path"] == str(photo) and len(run["image"]["sha256"]) == 64
    # Unguided inversion (1/step), then a shared source branch plus 2 rows for the one target.
    assert run["unet_image_evals"] == STEPS + STEPS * (1 + 2 * 1)
    assert run["timings"]["inversion_seconds"] > 0


def _bad_inputs(tmp: Path, model: Path, photo: Path) -> dict[str, list[str]]:
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "broken.png").write_bytes(photo.read_bytes()[:60])
    (tmp / "no-index").mkdir(exist_ok=True)
    ok = ["--target-prompt", "a dog", "--steps", str(STEPS), "--out", str(tmp / "o")]
    edit = ["edit", "--model", str(model)]
    synth = ["synthesize", "--model", str(model), "--source-prompt", "a cat"]
    return {
        "missing image": [*edit, "--image", str(tmp / "absent.png"), *ok],
        "image is a folder": [*edit, "--image", str(tmp), *ok],
        "not an image": [*edit, "--image", str(tmp / "notes.txt"), *ok],
        "truncated image": [*edit, "--image", str(tmp / "broken.png"), *ok],
        "unknown model path": ["synthesize", "--model", str(tmp / "nowhere" / "model")]
        + ["--source-prompt", "a cat", *ok],
        "folder without model_index": ["synthesize", "--model", str(tmp / "no-index")]
        + ["--source-prompt", "a cat", *ok],
        "start step out of range": [*synth, *ok, "--start-step", "9"],
        "start layer out of range": [*synth, *ok, "--start-step", "1", "--start-layer", "16"],
        "width not a multiple": [*synth, *ok, "--start-step", "1", "--width", "60"],
        "size over the model's limit": [*synth, *ok, "--start-step", "1", "--width", "320"],
        "no target prompt": [*synth, "--steps", str(STEPS), "--out", str(tmp / "o")],
        "zero steps": [*synth, "--target-prompt", "a dog", "--steps", "0", "--out", str(tmp)],
    }


BAD_INPUT_CASES = [
    "missing image",
    "image is a folder",
    "not an image",
    "truncated image",
    "unknown model path",
    "folder without model_index",
    "start step out of range",
    "start layer out of range",
    "width not a multiple",
    "size over the model's limit",
    "no target prompt",
    "zero steps",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    tiny_checkpoint: Path,
    photo: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = _bad_inputs(tmp_path, tiny_checkpoint, photo)[case]
    assert main(argv) == 2
    captured = capfd.readouterr()
    line = _stderr_line(captured.err)
    assert line.startswith(f"masactrl {argv[0]}: error: ")
    assert not (tmp_path / "o" / "run.json").exists()


def test_bad_input_from_the_console_script_process(tmp_path: Path) -> None:
    # A real process: exit status 2 and one line, with nothing else leaking to stderr.
    (tmp_path / "model_index.json").write_text("{}")
    argv = ["edit", "--model", str(tmp_path), "--image", str(tmp_path / "absent.jpg")]
    argv += ["--target-prompt", "a dog", "--out", str(tmp_path / "o")]
    done = subprocess.run(
        [sys.executable, "-m", "masactrl_cli.main", *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "absent.jpg does not exist" in _stderr_line(done.stderr)


# --- masks, SDXL and inversion guidance ------------------------------------------------------


def _mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (128, 128)) -> Path:
    image = Image.new("L", size, 0)
    image.paste(255, box)
    image.save(path)
    return path


def test_synthesize_with_mask_pairs_saves_the_masks(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    boy = _mask(tmp_path / "boy.png", (0, 0, 60, 128))
    girl = _mask(tmp_path / "girl.png", (70, 0, 128, 128))
    argv = ["synthesize", "--model", str(tiny_checkpoint), "--source-prompt", "a man and a woman"]
    argv += ["--target-prompt", "a man and a woman smiling", "--steps", str(STEPS)]
    argv += ["--start-step", "1", "--source-mask", str(boy), "--target-mask", str(boy)]
    argv += ["--source-mask", str(girl), "--target-mask", str(girl), "--save-masks"]
    argv += ["--out", str(out), "--quiet"]
    assert main(argv) == 0
    capfd.readouterr()
    run = json.loads((out / "run.json").read_text())
    assert run["masks"] == {
        "mode": "manual",
        "source": [str(boy), str(girl)],
        "target": [str(boy), str(girl)],
    }
    assert run["start_layer"] == 10  # the model's default, recorded as used
    assert sorted(run["outputs"]["masks"]) == [
        "mask_source_region_0.png",
        "mask_source_region_1.png",
        "mask_target_0_region_0.png",
        "mask_target_0_region_1.png",
    ]
    with Image.open(out / "mask_source_region_1.png") as saved:
        assert saved.size == (64, 64)
        assert saved.getpixel((0, 0)) == 0 and saved.getpixel((63, 0)) == 255


def test_edit_with_a_mask_word_and_inversion_guidance(
    tiny_checkpoint: Path, photo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edit"
    argv = ["edit", "--model", str(tiny_checkpoint), "--image", str(photo)]
    argv += ["--source-prompt", "a photo of a cat", "--target-prompt", "a cat running"]
    argv += ["--steps", str(STEPS), "--start-step", "1", "--mask-word", "cat:cat"]
    argv += ["--mask-threshold", "0.3", "--save-masks", "--inversion-guidance", "2"]
    argv += ["--out", str(out), "--quiet"]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["masks"] == {
        "mode": "word",
        "source_word": "cat",
        "target_word": "cat",
        "threshold": 0.3,
    }
    assert run["inversion_guidance_scale"] == 2.0
    assert "wrote 2 mask(s)" in capfd.readouterr().out
    # Guided inversion (2 per step), then separate source rows for the two guidance halves.
    assert run["unet_image_evals"] == 2 * STEPS + STEPS * (2 + 2)
    assert (out / "mask_target_0_region_0.png").is_file()


def test_synthesize_on_sdxl_uses_the_sdxl_defaults(
    tiny_sdxl_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "xl"
    argv = ["synthesize", "--model", str(tiny_sdxl_checkpoint), "--source-prompt", "a cat"]
    argv += ["--target-prompt", "a cat running", "--steps", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    capfd.readouterr()
    run = json.loads((out / "run.json").read_text())
    assert (run["family"], run["block_count"], run["start_layer"]) == ("sdxl", 70, 44)
    assert run["start_step"] == 2  # the default 4, clipped to a 2-step run
    with Image.open(out / "target_0.png") as image:
        assert image.size == (64, 64)


def _bad_mask_inputs(tmp: Path, model: Path) -> dict[str, list[str]]:
    left = _mask(tmp / "left.png", (0, 0, 64, 128))
    black = _mask(tmp / "black.png", (0, 0, 0, 0))
    (tmp / "notes.txt").write_text("not an image")
    synth = ["synthesize", "--model", str(model), "--source-prompt", "a cat sitting"]
    synth += ["--target-prompt", "a cat running", "--steps", str(STEPS), "--start-step", "1"]
    synth += ["--out", str(tmp / "o")]
    return {
        "missing mask file": [*synth, "--source-mask", str(tmp / "absent.png")]
        + ["--target-mask", str(left)],
        "unreadable mask file": [*synth, "--source-mask", str(left)]
        + ["--target-mask", str(tmp / "notes.txt")],
        "unpaired masks": [*synth, "--source-mask", str(left), "--source-mask", str(left)]
        + ["--target-mask", str(left)],
        "word not in the prompt": [*synth, "--mask-word", "dog:cat"],
        "empty source region": [*synth, "--source-mask", str(black), "--target-mask", str(left)],
        "malformed mask word": [*synth, "--mask-word", "cat"],
        "masks and a word": [*synth, "--mask-word", "cat:cat", "--source-mask", str(left)]
        + ["--target-mask", str(left)],
        "threshold without a word": [*synth, "--mask-threshold", "0.2"],
    }


BAD_MASK_CASES = [
    ("missing mask file", "source mask 0"),
    ("unreadable mask file", "target mask 0"),
    ("unpaired masks", "one --target-mask per --source-mask"),
    ("word not in the prompt", "source word 'dog' is not in the source prompt"),
    ("empty source region", "source mask 0 selects no"),
    ("malformed mask word", "SOURCE_WORD:TARGET_WORD"),
    ("masks and a word", "not both"),
    ("threshold without a word", "--mask-threshold"),
]


@pytest.mark.parametrize(("case", "message"), BAD_MASK_CASES)
def test_bad_mask_input_is_one_line_and_exit_2(
    case: str,
    message: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = _bad_mask_inputs(tmp_path, tiny_checkpoint)[case]
    assert main(argv) == 2
    line = _stderr_line(capfd.readouterr().err)
    assert line.startswith("masactrl synthesize: error: ")
    assert message in line
    assert not (tmp_path / "o" / "run.json").exists()
