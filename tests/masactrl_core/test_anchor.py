"""Anchored editing: the source follows the photo's own inversion trajectory, step by step."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from masactrl_core import Condition, ControlConfig, InvalidInput, InvertedImage, MaskConfig
from masactrl_core.engine import with_options
from tests.masactrl_core import test_conditions as shared
from tests.masactrl_core.test_conditions import (
    ATOL,
    CONTROL,
    STEPS,
    assert_close,
    effect,
    layout_image,
    reference_denoise,
)

# The condition tests' fixtures, reused here rather than rewritten.
engine, photo, controlnet, adapter = shared.engine, shared.photo, shared.controlnet, shared.adapter
controlnet_dir, adapter_dir = shared.controlnet_dir, shared.adapter_dir

TARGETS = ["a red house at night", "a blue house"]


@pytest.fixture(scope="module")
def inverted(engine, photo) -> InvertedImage:
    return engine.invert(photo, steps=STEPS)


def test_inversion_keeps_its_trajectory(engine, photo, inverted):
    trajectory = inverted.trajectory
    assert trajectory is not None and trajectory.shape == (STEPS + 1, 4, 32, 32)
    assert torch.equal(trajectory[-1:], inverted.latents)
    with torch.inference_mode():
        clean = engine._encode_image(photo, 64, 64).float()
    assert torch.equal(trajectory[0], clean[0])
    # Each step moves the latent: the trajectory is not x_T repeated.
    assert all(effect(a, b) > 20 * ATOL for a, b in zip(trajectory, trajectory[1:], strict=False))


def test_trajectory_survives_safetensors_and_its_presence_is_in_the_metadata(inverted):
    data = inverted.to_safetensors_bytes()
    loaded = InvertedImage.from_safetensors_bytes(data)
    assert loaded.has_trajectory and torch.equal(loaded.trajectory, inverted.trajectory)
    assert torch.equal(loaded.latents, inverted.latents)
    assert b'"trajectory":"true"' in data[:4096]
    bare = inverted.without_trajectory()
    assert not bare.has_trajectory and bare.latents is inverted.latents
    bare_data = bare.to_safetensors_bytes()
    assert b'"trajectory":"false"' in bare_data[:4096]
    assert InvertedImage.from_safetensors_bytes(bare_data).trajectory is None


def test_anchored_edit_equals_reference_with_n_targets(engine, photo, inverted):
    ours = engine.edit(photo, TARGETS, steps=STEPS, control=CONTROL, anchor_source=True)
    expected = reference_denoise(
        engine, inverted.latents, "", TARGETS, CONTROL, anchor=inverted.trajectory
    )
    assert_close(ours.latents, expected)
    free = engine.edit(photo, TARGETS, steps=STEPS, control=CONTROL)
    assert effect(ours.latents, free.latents) > 20 * ATOL


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_anchored_conditioned_edit_equals_reference(engine, inverted, controlnet, adapter, kind):
    model = controlnet if kind == "controlnet" else adapter
    condition = Condition(model, [layout_image(8), layout_image(9)], scale=0.8, end=0.75)
    ours = with_options(engine, max_batch=2).edit(
        None,
        TARGETS,
        steps=STEPS,
        control=CONTROL,
        inverted=inverted,
        condition=condition,
        anchor_source=True,
    )
    expected = reference_denoise(
        engine, inverted.latents, "", TARGETS, CONTROL, condition, anchor=inverted.trajectory
    )
    assert_close(ours.latents, expected)


def test_anchoring_works_from_the_cache_and_with_masks(engine, photo, inverted):
    cached = InvertedImage.from_safetensors_bytes(inverted.to_safetensors_bytes())
    left = Image.new("L", (64, 64))
    left.paste(255, (0, 0, 32, 64))
    masks = MaskConfig(regions=[(left, left)])
    kwargs = dict(steps=STEPS, control=CONTROL, anchor_source=True, masks=masks)
    fresh = engine.edit(photo, TARGETS, **kwargs)
    from_cache = engine.edit(None, TARGETS, inverted=cached, **kwargs)
    assert torch.equal(fresh.latents, from_cache.latents)
    unmasked = engine.edit(None, TARGETS, inverted=cached, steps=STEPS, control=CONTROL)
    assert effect(fresh.latents[1:], unmasked.latents[1:]) > 20 * ATOL


def test_anchoring_without_a_trajectory_is_a_clear_error(engine, inverted):
    bare = InvertedImage(inverted.latents, STEPS, 64, 64, "")
    with pytest.raises(InvalidInput, match="trajectory"):
        engine.edit(None, TARGETS, steps=STEPS, inverted=bare, anchor_source=True)
    # Without anchoring, an inversion without a trajectory still edits.
    engine.edit(None, TARGETS[:1], steps=STEPS, inverted=bare, control=ControlConfig(steps=[]))
