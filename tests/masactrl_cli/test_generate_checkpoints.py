"""``masactrl synthesize`` with a single-file ``--model`` and ``--lora`` adapters; the client's
``--lora`` as the request's ``loras``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from masactrl_cli.client import _loras
from masactrl_cli.main import main
from masactrl_cli.options import LoraSpec, lora_spec

STEPS = 3
PROMPTS = ["--source-prompt", "a photo of a cat", "--target-prompt", "a photo of a dog"]
SAMPLING = ["--seed", "7", "--steps", str(STEPS), "--start-step", "1", "--quiet"]


def _stderr_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, lines
    return lines[0]


def test_lora_specs_take_an_optional_weight() -> None:
    assert lora_spec("ink") == LoraSpec("ink", None)
    assert lora_spec("ink:0.8") == LoraSpec("ink", 0.8)
    assert lora_spec("/loras/ink.safetensors:-1") == LoraSpec("/loras/ink.safetensors", -1.0)
    assert lora_spec("C:/loras/ink") == LoraSpec("C:/loras/ink", None)  # not a number: a path
    args = argparse.Namespace(loras=[lora_spec("ink"), lora_spec("oil:0.5")])
    assert _loras(args) == [{"name": "ink"}, {"name": "oil", "weight": 0.5}]
    assert _loras(argparse.Namespace(loras=[])) is None


def test_synthesize_on_a_single_file_with_adapters(
    tiny_checkpoint: Path, tiny_single_file: Any, tiny_loras: dict[str, Any], tmp_path: Path
) -> None:
    style, pose = tiny_loras["style"], tiny_loras["pose"]
    out = tmp_path / "out"
    argv = ["synthesize", "--model", str(tiny_single_file.file)]
    argv += ["--model-config", str(tiny_single_file.config), *PROMPTS, *SAMPLING]
    argv += ["--lora", f"{style.file}:0.6", "--lora", str(pose.path), "--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == str(tiny_single_file.file)
    assert run["model_config"] == str(tiny_single_file.config)
    assert run["loras"] == [
        {"name": str(style.file), "weight": 0.6},
        {"name": str(pose.path), "weight": 1.0},
    ]

    from masactrl_core import ControlConfig, MasaCtrlEngine

    engine = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    engine.loras.load("style", style.file)
    engine.loras.load("pose", pose.path)
    with engine.loras.activated({"style": 0.6, "pose": 1.0}):
        expected = engine.synthesize(
            "a photo of a cat",
            ["a photo of a dog"],
            seed=7,
            steps=STEPS,
            control=ControlConfig(start_step=1, start_layer=10),
        )
    with Image.open(out / "target_0.png") as image:
        actual = torch.tensor(list(image.getdata()))
    assert torch.equal(actual, torch.tensor(list(expected.targets[0].getdata())))


def test_single_file_and_adapter_misuse_is_one_line_and_exit_2(
    tiny_checkpoint: Path,
    tiny_single_file: Any,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = ["--out", str(tmp_path / "out"), *PROMPTS, *SAMPLING]
    config = ["--model-config", str(tiny_single_file.config)]
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not even a pickle")
    cases = {
        "--model /nowhere/model.safetensors: no such file": [
            "--model",
            "/nowhere/model.safetensors",
        ],
        "--model-config applies only to a single-file --model": [
            "--model",
            str(tiny_checkpoint),
            *config,
        ],
        "old.ckpt is a pickle checkpoint, which can run arbitrary code": [
            "--model",
            str(pickle),
            *config,
        ],
        "each --lora may be given once": [
            "--model",
            str(tiny_checkpoint),
            "--lora",
            "x:1",
            "--lora",
            "x:2",
        ],
        "LoRA /nowhere/ink: /nowhere/ink does not exist": [
            "--model",
            str(tiny_checkpoint),
            "--lora",
            "/nowhere/ink",
        ],
    }
    for expected, model in cases.items():
        assert main(["synthesize", *model, *out]) == 2, expected
        assert expected in _stderr_line(capfd.readouterr().err)
