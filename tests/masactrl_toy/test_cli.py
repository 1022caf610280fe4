"""``masactrl toy-model``: bad arguments are one-line usage errors, before any training starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from masactrl_cli.main import EXIT_USAGE, main


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--minutes", "0"], "--minutes must be positive"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--size", "24"], "--size must be a positive multiple of 16"),
    ],
)
def test_bad_arguments_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["toy-model", "train", str(tmp_path / "out"), *extra]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_must_not_be_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["toy-model", "train", str(tmp_path / "f")]) == EXIT_USAGE
    assert "is not a folder" in capsys.readouterr().err
