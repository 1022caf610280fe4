"""``masactrl tiny-model --condition``: a ControlNet or T2I-Adapter fitting a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from masactrl_cli.main import main


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-base") / "model"
    assert main(["tiny-model", str(out), "--family", "sdxl"]) == 0
    return out


@pytest.mark.parametrize(
    ("kind", "class_name"), [("controlnet", "ControlNetModel"), ("adapter", "T2IAdapter")]
)
def test_condition_models_fit_the_base_and_load_in_the_engine(
    base: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str, class_name: str
) -> None:
    out = tmp_path / kind
    assert main(["tiny-model", str(out), "--condition", kind, "--base", str(base)]) == 0
    assert str(out) in capfd.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == class_name
    from masactrl_core import MasaCtrlEngine

    model = MasaCtrlEngine.from_pretrained(base, device="cpu").load_condition_model(out)
    assert (model.kind, model.family) == (kind, "sdxl")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--condition", "controlnet"], "--condition needs --base"),
        (["--base", "."], "--base is only used with --condition"),
        (["--condition", "adapter", "--base", "{base}", "--family", "sd"], "read from --base"),
        (["--condition", "adapter", "--base", "{missing}"], "not a diffusers checkpoint"),
    ],
)
def test_flag_mistakes_are_one_line_usage_errors(
    base: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = [a.format(base=base, missing=tmp_path / "missing") for a in extra]
    assert main(["tiny-model", str(tmp_path / "out"), *argv]) == 2
    assert message in capfd.readouterr().err
    assert not (tmp_path / "out").exists()
