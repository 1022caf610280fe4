"""Checkpoints shaped unlike SD 1.5 (pruned and distilled models: other levels, other block
counts, no mid block) through every engine path, with their measured defaults and explicit
values, against the explicit-softmax reference and the plain diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from masactrl_core import ControlConfig, MasaCtrlEngine, MaskConfig
from masactrl_core.engine import with_options
from masactrl_jobs.shape import default_start_layer
from tests.masactrl_core.test_engine import ATOL, ExplicitSoftmaxMasaCtrl, assert_close

STEPS = 5
SYNTHESIS = dict(source_prompt="a cat sitting", target_prompts=["a cat running"], seed=3)
# Blocks and levels as the UNets measure them (counted here from the model, never from a table).
EXPECTED_BLOCKS = {"two-level": 7, "no-mid": 9, "three-level": 11}


@pytest.fixture(scope="module", params=sorted(EXPECTED_BLOCKS))
def shaped(request, tiny_shaped_checkpoints) -> tuple[str, MasaCtrlEngine, Path]:
    path = tiny_shaped_checkpoints[request.param]
    return request.param, MasaCtrlEngine.from_pretrained(path, device="cpu"), path


def reference(engine: MasaCtrlEngine) -> MasaCtrlEngine:
    view = with_options(engine, share_source_branch=False, skip_redundant_guidance=False)
    view.processor_class = ExplicitSoftmaxMasaCtrl
    return view


def test_the_shape_is_measured_from_the_model(shaped) -> None:
    variant, engine, _ = shaped
    blocks = sum(1 for name in engine.unet.attn_processors if name.endswith("attn1.processor"))
    assert engine.block_count == blocks == EXPECTED_BLOCKS[variant]
    assert engine.default_control.start_layer == default_start_layer(blocks)
    assert engine.default_control.start_step == 4
    downsamplers = sum(1 for block in engine.unet.down_blocks if block.downsamplers)
    assert engine.size_multiple == engine.vae_scale_factor * 2**downsamplers


@pytest.mark.parametrize("explicit", [False, True])
def test_synthesis_equals_the_reference_with_defaults_and_explicit_values(shaped, explicit) -> None:
    _, engine, _ = shaped
    # None: the model's defaults, start step 4 (of 8 here) and its depth's start layer.
    control = ControlConfig(start_step=1, start_layer=3) if explicit else None
    kwargs = dict(steps=STEPS if explicit else 8, **SYNTHESIS)
    ours = engine.synthesize(control=control, **kwargs)
    expected = reference(engine).synthesize(control=control, **kwargs)
    assert_close(ours.latents, expected.latents)
    off = engine.synthesize(control=ControlConfig(steps=[]), **kwargs)
    assert (ours.latents[1] - off.latents[1]).abs().max() > 20 * ATOL


def test_an_edit_with_masks_equals_the_reference(shaped) -> None:
    _, engine, _ = shaped
    photo = engine.synthesize("a red house", ["a red house"], seed=7, steps=3).source
    half = torch.zeros(64, 64)
    half[:, :32] = 1.0
    masks = MaskConfig(regions=[(half.numpy(), half.numpy())])
    control = ControlConfig(start_step=1, start_layer=2)
    kwargs = dict(target_prompts=["a red house at night"], steps=STEPS, control=control)
    ours = engine.edit(photo, masks=masks, **kwargs)
    plain = engine.edit(photo, **kwargs)
    assert (ours.latents[1] - plain.latents[1]).abs().max() > 20 * ATOL
    # Same (unguided) inversion; denoising in the authors' batch layout with explicit softmax.
    unmasked_reference = reference(engine).edit(photo, **kwargs)
    assert_close(plain.latents, unmasked_reference.latents)


@pytest.mark.parametrize(
    "control", [ControlConfig(start_step=STEPS), ControlConfig(steps=[])], ids=["start", "empty"]
)
def test_no_control_is_the_plain_pipeline_with_its_evaluation_count(shaped, control) -> None:
    _, engine, path = shaped
    targets = ["a cat running", "a dog"]
    result = engine.synthesize("a cat sitting", targets, seed=3, steps=STEPS, control=control)
    assert result.stats.unet_image_evals == 2 * (1 + len(targets)) * STEPS
    pipeline = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    noise = engine.initial_noise(3, *engine.native_size)
    for index, prompt in enumerate(targets, start=1):
        expected = pipeline(
            prompt, num_inference_steps=STEPS, latents=noise, output_type="latent"
        ).images
        assert_close(result.latents[index : index + 1], expected)


def test_a_distilled_sdxl_shape_runs_with_its_measured_defaults(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from masactrl_core.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "shallow", family="sdxl", variant="shallow")
    engine = MasaCtrlEngine.from_pretrained(path, device="cpu")
    blocks = sum(1 for name in engine.unet.attn_processors if name.endswith("attn1.processor"))
    assert engine.block_count == blocks == 17
    assert engine.default_control.start_layer == default_start_layer(17) == 11
    for control in (None, ControlConfig(start_step=1, start_layer=5)):
        ours = engine.synthesize(control=control, steps=6, **SYNTHESIS)
        expected = reference(engine).synthesize(control=control, steps=6, **SYNTHESIS)
        assert_close(ours.latents, expected.latents)
    off = engine.synthesize(control=ControlConfig(start_step=STEPS), steps=STEPS, **SYNTHESIS)
    pipeline = StableDiffusionXLPipeline.from_pretrained(path)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    noise = engine.initial_noise(SYNTHESIS["seed"], *engine.native_size)
    expected = pipeline(
        SYNTHESIS["target_prompts"][0],
        num_inference_steps=STEPS,
        guidance_scale=7.5,  # the engine's default; SDXL's pipeline defaults to 5.0
        latents=noise,
        output_type="latent",
    ).images
    assert_close(off.latents[1:2], expected)
