"""``masactrl synthesize --model FILE --model-config FOLDER`` on a single-file SD3 transformer:
the same images as the folder; a prediction type is exit status 2 with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from masactrl_cli.main import main

ARGS = ["--source-prompt", "a photo of a cat", "--target-prompt", "a photo of a dog"]
ARGS += ["--seed", "7", "--steps", "3", "--start-step", "1", "--quiet"]
ARGS += ["--width", "64", "--height", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from masactrl_core.tiny import write_tiny_checkpoint
    from masactrl_core.tiny_single_file import write_transformer_single_file

    root = tmp_path_factory.mktemp("cli-sd3")
    folder = write_tiny_checkpoint(root / "model", family="sd3")
    return folder, write_transformer_single_file(folder, root / "sd3.safetensors", family="sd3")


def test_a_single_file_sd3_model_gives_the_folders_images(
    sd3: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, file = sd3
    assert main(["synthesize", "--model", str(folder), *ARGS, "--out", str(tmp_path / "a")]) == 0
    argv = ["synthesize", "--model", str(file), "--model-config", str(folder), *ARGS]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    images = sorted(path.name for path in (tmp_path / "a").glob("*.png"))
    assert images
    for name in images:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_prediction_type_for_an_sd3_file_is_one_line(
    sd3: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, file = sd3
    argv = ["synthesize", "--model", str(file), "--model-config", str(folder), *ARGS]
    assert main([*argv, "--prediction-type", "epsilon", "--out", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "sd3.safetensors is an sd3 transformer" in lines[0], lines
