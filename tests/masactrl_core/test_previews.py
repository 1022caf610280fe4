"""Live previews: x̂₀ reaches the callback every step, previews come at the due steps and decode
to small images, with a tiny autoencoder or the model's VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from masactrl_core import ControlConfig, MasaCtrlEngine, ModelLoadError
from masactrl_core.previews import PreviewDecoder, Previews, load_preview_decoder

CONTROL = ControlConfig(start_step=1, start_layer=10)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def preview_vae(tiny_preview_vae: Path) -> Path:
    return tiny_preview_vae


@pytest.fixture(scope="module")
def source_image():
    from PIL import Image

    return Image.effect_noise((64, 64), 40).convert("RGB")


def _collect(decoder: PreviewDecoder, every: int) -> tuple[Previews, list]:
    """Previews every ``every`` steps, and the list of what they deliver."""
    seen: list = []
    sink = lambda step, total, images: seen.append((step, total, images))  # noqa: E731
    return Previews(decoder, sink, every=every), seen


def test_every_step_hands_x0_of_every_image_and_it_converges_to_the_result(engine):
    seen = []
    result = engine.synthesize(
        "a cat sitting",
        ["a cat running", "a dog"],
        seed=1,
        steps=8,
        control=CONTROL,
        on_latents=lambda step, total, x0: seen.append((step, total, x0.clone())),
    )
    assert [(step, total) for step, total, _ in seen] == [(s, 8) for s in range(1, 9)]
    assert all(x0.shape == (3, 4, 32, 32) for _, _, x0 in seen)
    final = result.latents
    gaps = [float((x0.float() - final).abs().mean()) for _, _, x0 in seen]
    # x̂₀ of the noisiest step is far from the result; the last one is nearly the result (DDIM's
    # last step adds back only sqrt(1 - ᾱ₀) ≈ 0.03 of its noise estimate).
    assert gaps[0] > 10 * gaps[-1]
    assert gaps[-1] < 0.1


def test_previews_come_every_n_steps_but_never_at_the_last(engine, preview_vae):
    decoder = load_preview_decoder(engine, preview_vae)
    assert decoder.tiny
    previews, seen = _collect(decoder, every=3)
    engine.synthesize(
        "a cat sitting", ["a cat running"], seed=2, steps=9, control=CONTROL, on_latents=previews
    )
    assert [(step, total) for step, total, _ in seen] == [(3, 9), (6, 9)]
    for _, _, images in seen:
        assert [image.size for image in images] == [(64, 64), (64, 64)]
        assert all(image.mode == "RGB" for image in images)
        # A random decoder whose output ignored its input would pass the size checks alone.
        assert all(np.asarray(image).std() > 1 for image in images)
    # Source and target differ once control has had steps to act on different prompts.
    source, target = (np.asarray(image, dtype=np.int16) for image in seen[-1][2])
    assert np.abs(source - target).mean() > 0


def test_previews_are_at_most_max_side_long_and_keep_the_aspect(engine, preview_vae):
    decoder = load_preview_decoder(engine, preview_vae, max_side=32)
    previews, seen = _collect(decoder, every=2)
    engine.synthesize(
        "a cat", ["a dog"], seed=3, steps=4, width=128, height=64, on_latents=previews
    )
    assert [step for step, _, _ in seen] == [2]
    assert [image.size for image in seen[0][2]] == [(32, 16), (32, 16)]


def test_without_a_tiny_autoencoder_the_models_vae_decodes_previews(engine, source_image):
    decoder = load_preview_decoder(engine, None)
    assert not decoder.tiny and decoder.vae is engine.vae
    previews, seen = _collect(decoder, every=2)
    result = engine.edit(
        source_image, ["a cat running"], source_prompt="a cat", steps=5, on_latents=previews
    )
    assert [step for step, _, _ in seen] == [2, 4]
    assert [image.size for image in seen[-1][2]] == [(64, 64), (64, 64)]
    # The last preview is already close to the final picture the same VAE decodes.
    last = np.asarray(seen[-1][2][1], dtype=np.float32)
    final = np.asarray(result.targets[0], dtype=np.float32)
    first = np.asarray(seen[0][2][1], dtype=np.float32)
    assert np.abs(last - final).mean() < np.abs(first - final).mean()


def test_sequence_previews_hold_the_source_then_every_frame(engine, preview_vae, tmp_path):
    from PIL import Image

    from masactrl_core.conditions import Condition
    from masactrl_core.tiny_conditions import write_tiny_condition_model

    controlnet_dir = write_tiny_condition_model(
        tmp_path / "cn", kind="controlnet", base=engine.model_name, seed=1
    )
    controlnet = engine.load_condition_model(controlnet_dir)
    frames = [Image.effect_noise((64, 64), 20 + k).convert("RGB") for k in range(3)]
    previews, seen = _collect(load_preview_decoder(engine, preview_vae), every=2)
    engine.sequence(
        "a cat", "a cat", Condition(controlnet, frames), seed=0, steps=3, on_latents=previews
    )
    assert [(step, len(images)) for step, _, images in seen] == [(2, 4)]


def test_a_rate_limit_thins_previews_out_by_time():
    decoder = PreviewDecoder(object(), tiny=True)
    now = [0.0]
    previews = Previews(decoder, lambda *_: None, every=1, min_interval=0.5, clock=lambda: now[0])
    due = []
    for step in range(1, 11):
        if previews.due(step, 20):
            due.append(step)
        now[0] += 0.2  # five steps a second
    # At most one preview per half second: steps 1, 4, 7 and 10 (0.0, 0.6, 1.2 and 1.8 s).
    assert due == [1, 4, 7, 10]


def test_a_preview_autoencoder_for_other_latents_is_refused(engine, tmp_path):
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    torch.manual_seed(0)
    other = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=16,
    )
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelLoadError, match="16-channel latents, but the model's have 4"):
        load_preview_decoder(engine, tmp_path / "other")
    with pytest.raises(ModelLoadError, match="cannot load preview autoencoder"):
        load_preview_decoder(engine, tmp_path / "missing")
