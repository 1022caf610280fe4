"""The committed toy-world checkpoint: loads like any model, declares the paper's control, draws.

These tests use models/toy-shapes as committed (loading and a few steps); nothing retrains it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from masactrl_toy.effect import total_variation
from masactrl_toy.world import vocabulary

TOY = Path(__file__).resolve().parents[2] / "models" / "toy-shapes"


@pytest.fixture(scope="module")
def toy_engine():
    import torch

    from masactrl_core import MasaCtrlEngine

    torch.manual_seed(0)
    return MasaCtrlEngine.from_pretrained(TOY, device="cpu")


def test_the_folder_is_small_and_complete() -> None:
    files = [p for p in TOY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    for part in ("README.md", "examples.json", "masactrl.json", "training.json"):
        assert (TOY / part).is_file()
    assert (TOY / "samples" / "final.png").is_file()


def test_examples_are_prompt_pairs_in_the_vocabulary() -> None:
    examples = json.loads((TOY / "examples.json").read_text())
    words = set(vocabulary())
    assert examples and all(set(e) == {"source_prompt", "target_prompt"} for e in examples)
    for example in examples:
        assert example["source_prompt"] != example["target_prompt"]
        used = example["source_prompt"].split() + example["target_prompt"].split()
        assert set(used) <= words


def test_loads_with_the_papers_control_in_its_decoder(toy_engine) -> None:
    assert toy_engine.native_size == (32, 32) and toy_engine.block_count == 16
    control = toy_engine.default_control
    assert (control.start_step, control.start_layer) == (4, 10)
    assert toy_engine.layer_names[10].startswith("up_blocks.2.")  # the decoder's later blocks


def test_declares_the_worlds_vocabulary(toy_engine) -> None:
    assert toy_engine.vocabulary is not None
    assert toy_engine.vocabulary.words == frozenset(vocabulary())
    example = json.loads((TOY / "examples.json").read_text())[0]
    assert toy_engine.prompt_warnings([("source_prompt", example["source_prompt"])]) == []
    # The README's everyday prompt: words the toy world never had.
    (warning,) = toy_engine.prompt_warnings([("target_prompts[0]", "a house and a cat")])
    assert warning.startswith(
        "target_prompts[0]: the model does not know the words 'house', 'and', 'cat';"
    )


def test_draws_pictures_not_noise(toy_engine) -> None:
    example = json.loads((TOY / "examples.json").read_text())[0]
    result = toy_engine.synthesize(
        example["source_prompt"], [example["target_prompt"]], seed=0, steps=12
    )
    images = [result.source, *result.targets]
    assert [image.size for image in images] == [(32, 32)] * 2
    # Flat regions and clean edges: a drawing's neighbouring pixels differ little (the random
    # tiny checkpoint's structured noise measures ~0.13, the toy model's drawings ~0.03).
    assert all(total_variation(image) < 0.1 for image in images)
