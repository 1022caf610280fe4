"""SDXL layout conditions: MasaCtrl off equals diffusers' SDXL ControlNet pipeline; refusals."""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, StableDiffusionXLControlNetPipeline

from masactrl_core import Condition, ControlConfig, InvalidInput
from masactrl_core.engine import MasaCtrlEngine
from masactrl_core.tiny_conditions import write_tiny_condition_model
from tests.masactrl_core.test_conditions import (
    assert_close,
    effect,
    layout_image,
    reference_denoise,
)

STEPS = 3
ATOL = 2e-4
SYNTHESIS = dict(source_prompt="a cat sitting", target_prompts=["a cat running"], seed=3)


@pytest.fixture(scope="module")
def engine(tiny_sdxl_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_sdxl_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sdxl_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-sdxl-controlnet") / "model"
    return write_tiny_condition_model(out, kind="controlnet", base=tiny_sdxl_checkpoint, seed=1)


def test_sdxl_controlnet_without_masactrl_equals_diffusers_pipeline(
    engine, controlnet_dir, tiny_sdxl_checkpoint
):
    controlnet = engine.load_condition_model(controlnet_dir)
    assert (controlnet.kind, controlnet.family) == ("controlnet", "sdxl")
    image = layout_image(1)
    condition = Condition(controlnet, [image], scale=0.7, start=0.3)
    off = ControlConfig(start_step=STEPS)
    ours = engine.synthesize(steps=STEPS, control=off, condition=condition, **SYNTHESIS)
    # 2 rows (both guidance halves of the target) on the 2 of 3 steps the window keeps.
    assert ours.stats.condition_evals == 2 * 2
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_checkpoint, controlnet=controlnet.model, add_watermarker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        SYNTHESIS["target_prompts"][0],
        image=image,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=engine.initial_noise(SYNTHESIS["seed"], 64, 64),
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.3,
        output_type="latent",
    ).images
    assert_close(ours.latents[1:], expected)
    plain = engine.synthesize(steps=STEPS, control=off, **SYNTHESIS)
    assert effect(ours.latents[1:], plain.latents[1:]) > 20 * ATOL


def test_sd_adapter_on_sdxl_is_refused(engine, tiny_checkpoint, tmp_path):
    sd_adapter = write_tiny_condition_model(tmp_path / "ad", kind="adapter", base=tiny_checkpoint)
    with pytest.raises(InvalidInput, match="made for sd models"):
        engine.load_condition_model(sd_adapter)


def test_sdxl_conditioned_masactrl_equals_explicit_reference(engine, controlnet_dir):
    controlnet = engine.load_condition_model(controlnet_dir)
    control = ControlConfig(start_step=1, start_layer=44)
    targets = ["a cat running", "a dog jumping"]
    condition = Condition(controlnet, layout_image(3), source_image=layout_image(5), end=0.7)
    ours = engine.synthesize(
        "a cat sitting", targets, seed=3, steps=STEPS, control=control, condition=condition
    )
    noise = engine.initial_noise(3, 64, 64)
    expected = reference_denoise(
        engine, noise, "a cat sitting", targets, control, condition, steps=STEPS
    )
    assert_close(ours.latents, expected)
    # Rows of all three images, both guidance halves, on the 2 of 3 steps the window keeps.
    assert ours.stats.condition_evals == 2 * 3 * 2
