"""The toy trainer: a few seconds of training on a tiny config lowers the loss and saves a
checkpoint the engine loads with the paper's layer numbering."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest

from masactrl_toy.train import ToyConfig, train, write_tokenizer
from masactrl_toy.world import caption, random_scene, vocabulary

TINY = ToyConfig(
    image_size=16,
    vae_channels=(8, 16),
    unet_channels=(8, 16, 16, 16),
    unet_heads=2,
    text_width=16,
    batch_size=8,
    unet_lr=2e-3,
    vae_fraction=0.25,
    sample_every_s=1e9,
)


def test_tokenizer_gives_each_word_one_token(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    text = caption(random_scene(0))
    assert len(tokenizer(text).input_ids) == len(text.split()) + 2  # plus start and end


@pytest.mark.slow
def test_short_training_lowers_loss_and_loads_in_the_engine(tmp_path: Path) -> None:
    import torch

    from masactrl_core import MasaCtrlEngine

    torch.set_num_threads(1)
    result = train(tmp_path / "toy", seed=0, minutes=5, max_steps=80, config=TINY)
    assert (result.vae_steps, result.unet_steps) == (20, 60)
    assert mean(result.vae_losses[-5:]) < mean(result.vae_losses[:5])
    # An untrained UNet predicts noise with loss ~1.0; 60 steps bring it to ~0.82 with seed 0.
    assert mean(result.unet_losses[-10:]) < 0.9 * mean(result.unet_losses[:10])
    assert json.loads((tmp_path / "toy" / "masactrl.json").read_text()) == {
        "start_step": 4,
        "start_layer": 10,
        "vocabulary": vocabulary(),
    }
    assert (tmp_path / "toy" / "samples" / "final.png").is_file()
    engine = MasaCtrlEngine.from_pretrained(tmp_path / "toy", device="cpu")
    assert engine.block_count == 16 and engine.native_size == (16, 16)
    assert engine.default_control.start_layer == 10
    # As in SD1.x: blocks 0-5 encoder, 6 middle, 7-15 decoder; the default start layer 10 is the
    # first block of the decoder's second cross-attention level (its later, higher-resolution half).
    assert engine.layer_names[6].startswith("mid_block.")
    assert engine.layer_names[7].startswith("up_blocks.1.")
    assert engine.layer_names[10].startswith("up_blocks.2.")
    assert engine.layer_names[9].startswith("up_blocks.1.")
    out = engine.synthesize(caption(random_scene(0)), [caption(random_scene(1))], seed=0, steps=3)
    assert out.targets[0].size == (16, 16)


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for name in ("a", "b"):
        train(tmp_path / name, seed=3, minutes=5, max_steps=4, config=TINY)
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert all(a[k].equal(b[k]) for k in a)
