"""SDXL on the tiny SDXL checkpoint: conditioning, plain-DDIM equivalence, control and masks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from masactrl_core import ControlConfig, MaskConfig
from masactrl_core.engine import MasaCtrlEngine, with_options
from tests.masactrl_core.test_engine import ExplicitSoftmaxMasaCtrl
from tests.masactrl_core.test_masks import manual_reference, rectangles

STEPS = 4
CONTROL = ControlConfig(start_step=1, start_layer=44)
ATOL = 2e-4
SYNTHESIS = dict(source_prompt="a cat sitting", target_prompts=["a cat running"], seed=3)


@pytest.fixture(scope="module")
def engine(tiny_sdxl_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_sdxl_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def plain(engine) -> MasaCtrlEngine:
    return with_options(engine, share_source_branch=False, skip_redundant_guidance=False)


@pytest.fixture(scope="module")
def source_image(engine) -> Image.Image:
    return engine.synthesize("a red house", ["a red house"], seed=7, steps=3).source


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= ATOL, f"max difference {difference:.2e} exceeds {ATOL:.0e}"


def reference(plain: MasaCtrlEngine, processor=ExplicitSoftmaxMasaCtrl) -> MasaCtrlEngine:
    view = with_options(plain)
    view.processor_class = processor
    return view


def test_family_defaults_and_description(engine):
    assert engine.family == "sdxl"
    assert engine.block_count == 70
    assert engine.native_size == (64, 64)
    assert (engine.default_control.start_step, engine.default_control.start_layer) == (4, 44)
    assert engine.force_zeros_for_empty_prompt
    assert engine.describe()["prediction_type"] == "epsilon"


def test_conditioning_has_pooled_embeds_time_ids_and_zeros_for_an_empty_negative(engine):
    prompts, uncond = engine._conditioning(["a cat", "a dog"], "", (96, 64))
    assert prompts.embeds.shape == (2, 77, 64)  # both encoders' hidden states, concatenated
    assert prompts.added["text_embeds"].shape == (2, 32)
    assert prompts.added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    assert not uncond.embeds.any() and not uncond.added["text_embeds"].any()
    # An explicit negative prompt is encoded, and so is an empty *source* prompt.
    empty, negative = engine._conditioning([""], "blurry", (64, 64))
    assert negative.embeds.any() and empty.embeds.any()


def test_disabled_control_equals_stable_diffusion_xl_pipeline(engine, tiny_sdxl_checkpoint):
    result = engine.synthesize(steps=STEPS, control=ControlConfig(start_step=STEPS), **SYNTHESIS)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_checkpoint)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    noise = engine.initial_noise(SYNTHESIS["seed"], *engine.native_size)
    expected = pipeline(
        SYNTHESIS["target_prompts"][0],
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=noise,
        output_type="latent",
    ).images
    assert_close(result.latents[1:2], expected)


def test_synthesis_equals_the_explicit_reference_and_control_matters(engine, plain):
    ours = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    expected = reference(plain).synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    assert_close(ours.latents, expected.latents)
    off = engine.synthesize(steps=STEPS, control=ControlConfig(steps=[]), **SYNTHESIS)
    assert (ours.latents[1] - off.latents[1]).abs().max() > 20 * ATOL
    assert torch.equal(ours.latents[0], off.latents[0])
    assert [image.size for image in [ours.source, *ours.targets]] == [(64, 64)] * 2


def test_edit_equals_the_explicit_reference_with_guided_inversion(engine, plain, source_image):
    kwargs = dict(target_prompts=["a red house at night"], steps=STEPS, control=CONTROL)
    ours = engine.edit(source_image, inversion_guidance_scale=3.0, **kwargs)
    expected = reference(plain).edit(source_image, inversion_guidance_scale=3.0, **kwargs)
    assert_close(ours.inverted.latents, expected.inverted.latents)
    assert_close(ours.latents, expected.latents)
    assert (ours.latents[1] - ours.latents[0]).abs().max() > 20 * ATOL


def test_inversion_runs_under_the_added_conditioning(engine, source_image):
    seen = []
    original = engine.unet.forward

    def spy(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        seen.append({k: v.clone() for k, v in added_cond_kwargs.items()})
        return original(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kwargs
        )

    engine.unet.forward = spy
    try:
        engine.invert(source_image, source_prompt="a red house", steps=2, width=64, height=32)
    finally:
        del engine.unet.forward
    assert len(seen) == 2  # unguided: one image per step
    for added in seen:
        assert added["time_ids"].tolist() == [[32, 64, 0, 0, 32, 64]]
        assert added["text_embeds"].shape == (1, 32) and added["text_embeds"].any()


def test_zeroed_negative_is_never_mistaken_for_the_empty_source_prompt(engine, source_image):
    # The empty source prompt is encoded; the empty negative is zeros: no shared source branch.
    kwargs = dict(target_prompts=["a blue house"], steps=2, control=CONTROL)
    zeros = engine.edit(source_image, **kwargs)
    assert zeros.stats.unet_image_evals == 2 + 2 * (2 + 2)
    encoded = with_options(engine)
    encoded.force_zeros_for_empty_prompt = False  # as a checkpoint without the flag
    shared = encoded.edit(source_image, **kwargs)
    assert shared.stats.unet_image_evals == 2 + 2 * (1 + 2)
    unshared = with_options(encoded, share_source_branch=False).edit(source_image, **kwargs)
    assert_close(shared.latents, unshared.latents)


def test_manual_masks_on_sdxl_equal_the_reference(engine, plain):
    pair = (rectangles((64, 64), [(0.1, 0.1, 0.7, 0.9)]), rectangles((64, 64), [(0.3, 0, 1, 0.6)]))
    masks = MaskConfig(regions=[pair])
    ours = engine.synthesize(steps=3, control=CONTROL, masks=masks, **SYNTHESIS)
    expected = reference(plain, manual_reference([pair])).synthesize(
        steps=3, control=CONTROL, masks=masks, **SYNTHESIS
    )
    assert_close(ours.latents, expected.latents)


def test_automatic_masks_on_sdxl_read_the_level_two_blocks(engine):
    plan = engine._prepare_masks(
        MaskConfig(source_word="cat", target_word="cat"),
        "a cat",
        ["a cat running"],
        64,
        64,
        engine._resolve_control(CONTROL, STEPS),
    )
    # SDXL's quarter grid is its deepest level: down_blocks.2, the mid block and up_blocks.0.
    assert plan.map_grid == (8, 8)
    assert plan.map_blocks == tuple(range(4, 64))
    result = engine.synthesize(
        steps=3,
        control=CONTROL,
        masks=MaskConfig(source_word="cat", target_word="cat"),
        **SYNTHESIS,
    )
    assert torch.isfinite(result.latents).all()
    assert set(result.masks) == {"source_region_0", "target_0_region_0"}


def test_fp16_vae_is_upcast_when_its_config_says_so(tiny_sdxl_checkpoint):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_checkpoint, dtype=torch.float16)
    engine = MasaCtrlEngine(pipeline, family="sdxl")
    assert engine.dtype == torch.float16
    assert engine.vae.dtype == torch.float32
