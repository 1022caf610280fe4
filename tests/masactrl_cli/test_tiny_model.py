"""``masactrl tiny-model``: writes the offline checkpoints of both families."""

from __future__ import annotations

from pathlib import Path

import pytest

from masactrl_cli.main import main


def test_tiny_model_command(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny-model", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert "64x64" in capfd.readouterr().out
    assert (tmp_path / "tiny" / "model_index.json").is_file()

    assert main(["tiny-model", str(tmp_path / "xl"), "--family", "sdxl"]) == 0
    assert "tiny sdxl checkpoint" in capfd.readouterr().out
    assert (tmp_path / "xl" / "text_encoder_2").is_dir()
