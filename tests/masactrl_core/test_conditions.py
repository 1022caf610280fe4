"""Layout conditions against independent definitions: diffusers' own pipelines and an explicit loop.

With MasaCtrl off, a conditioned target must be exactly what diffusers' ControlNet / T2I-Adapter
pipelines make from the same noise. With MasaCtrl on, the engine (shared source row, chunks,
condition model run only on conditioned rows) must equal :func:`reference_denoise`: the authors'
[source, targets] × 2 batch, explicit-softmax attention, the condition model run on every row and
its residuals zeroed on rows of images without a condition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
)
from PIL import Image

from masactrl_core import Condition, ControlConfig, InvalidInput, MasaCtrlEngine, ModelLoadError
from masactrl_core.attention import MutualAttentionState, install_processors
from masactrl_core.conditions import ConditionModel, condition_pixels, controlnet_keep
from masactrl_core.engine import with_options
from masactrl_core.tiny_conditions import build_tiny_condition_model, write_tiny_condition_model
from tests.masactrl_core.test_engine import ExplicitSoftmaxMasaCtrl

STEPS = 4
CONTROL = ControlConfig(start_step=1, start_layer=10)
OFF = ControlConfig(start_step=STEPS)
ATOL = 2e-4
SYNTHESIS = dict(source_prompt="a cat sitting", seed=3, steps=STEPS)


def layout_image(seed: int, size: int = 64) -> Image.Image:
    """A blocky random RGB picture: strong, seed-dependent structure for a condition model."""
    blocks = np.random.RandomState(seed).rand(8, 8, 3) * 255
    return Image.fromarray(blocks.astype("uint8")).resize((size, size), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def controlnet_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-controlnet") / "model"
    return write_tiny_condition_model(out, kind="controlnet", base=tiny_checkpoint, seed=1)


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-adapter") / "model"
    return write_tiny_condition_model(out, kind="adapter", base=tiny_checkpoint, seed=1)


@pytest.fixture(scope="module")
def controlnet(engine, controlnet_dir) -> ConditionModel:
    return engine.load_condition_model(controlnet_dir)


@pytest.fixture(scope="module")
def adapter(engine, adapter_dir) -> ConditionModel:
    return engine.load_condition_model(adapter_dir)


@pytest.fixture(scope="module")
def photo(engine) -> Image.Image:
    return engine.synthesize("a red house", ["a red house"], seed=7, steps=3).source


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= ATOL, f"max difference {difference:.2e} exceeds {ATOL:.0e}"


def effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def reference_denoise(
    engine: MasaCtrlEngine,
    noise: torch.Tensor,
    source_prompt: str,
    target_prompts: list[str],
    control: ControlConfig,
    condition: Condition | None = None,
    anchor: torch.Tensor | None = None,
    guidance_scale: float = 7.5,
    steps: int = STEPS,
) -> torch.Tensor:
    """MasaCtrl with a condition, written out on the authors' batch of 2 × (1 + N) rows."""
    n = len(target_prompts)
    size = engine._image_size(noise)
    prompts, uncond = engine._conditioning([source_prompt, *target_prompts], "", size)
    embeds = torch.cat([uncond.embeds.expand(n + 1, -1, -1), prompts.embeds])
    # SDXL's pooled embeddings and time ids, in the same row order (empty for SD).
    added = {
        key: torch.cat([uncond.added[key].expand(n + 1, -1), prompts.added[key]])
        for key in prompts.added
    }
    scheduler = DDIMScheduler.from_config(engine.scheduler.config)
    scheduler.set_timesteps(steps)
    controlled = control.resolve(steps, engine.block_count)
    state = MutualAttentionState(*controlled)
    original = install_processors(engine.unet, engine.layer_names, state, ExplicitSoftmaxMasaCtrl)
    rows_pixels = row_mask = None
    if condition is not None:
        width, height = size
        images = condition.images
        images = [images] if isinstance(images, Image.Image) else list(images)
        per_image = [
            condition.source_image,
            *(images[0] if len(images) == 1 else images[k] for k in range(n)),
        ]
        blank = Image.new("RGB", size)
        pixels = torch.cat(
            [condition_pixels(image or blank, width, height, 3) for image in per_image]
        )
        rows_pixels = torch.cat([pixels, pixels])
        has = torch.tensor([image is not None for image in per_image], dtype=torch.float32)
        row_mask = torch.cat([has, has]).view(-1, 1, 1, 1)
        keep = controlnet_keep(steps, condition.start, condition.end)
    latents = noise.expand(n + 1, -1, -1, -1).clone()
    try:
        with torch.inference_mode():
            for i, t in enumerate(scheduler.timesteps):
                state.begin_step(i)
                if anchor is not None:
                    latents[0] = anchor[steps - i]
                model_input = torch.cat([latents, latents])
                extra = {}
                if condition is not None:
                    model = condition.model.model
                    weight = condition.scale * keep[i]
                    if condition.model.kind == "controlnet":
                        down, mid = model(
                            model_input,
                            t,
                            encoder_hidden_states=embeds,
                            controlnet_cond=rows_pixels,
                            conditioning_scale=weight,
                            added_cond_kwargs=added or None,
                            return_dict=False,
                        )
                        extra = {
                            "down_block_additional_residuals": [d * row_mask for d in down],
                            "mid_block_additional_residual": mid * row_mask,
                        }
                    else:
                        features = model(rows_pixels)
                        extra = {
                            "down_intrablock_additional_residuals": [
                                f * weight * row_mask for f in features
                            ]
                        }
                out = engine.unet(
                    model_input,
                    t,
                    encoder_hidden_states=embeds,
                    added_cond_kwargs=added or None,
                    **extra,
                ).sample
                uncond_out, cond_out = out.chunk(2)
                guided = uncond_out + guidance_scale * (cond_out - uncond_out)
                latents = scheduler.step(guided, t, latents).prev_sample
    finally:
        engine.unet.set_attn_processor(dict(original))
        state.begin_step(None)
    return latents


# -- the tiny models ------------------------------------------------------------------------


def test_tiny_controlnet_residuals_are_not_zero(controlnet, engine):
    sample = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds = engine._conditioning(["a cat"], "", (64, 64))[0].embeds
    pixels = condition_pixels(layout_image(0), 64, 64, 3)
    with torch.inference_mode():
        down, mid = controlnet.model(
            sample, 500, encoder_hidden_states=embeds, controlnet_cond=pixels, return_dict=False
        )
    for residual in [*down, mid]:
        assert residual.abs().max() > 0.01


def test_tiny_condition_models_are_seeded(engine, controlnet_dir, adapter_dir, tmp_path):
    again = write_tiny_condition_model(
        tmp_path / "again", kind="adapter", base=engine.model_name, seed=1
    )
    name = "diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (adapter_dir / name).read_bytes()
    other = write_tiny_condition_model(
        tmp_path / "other", kind="controlnet", base=engine.model_name, seed=2
    )
    assert (other / name).read_bytes() != (controlnet_dir / name).read_bytes()


# -- MasaCtrl off: diffusers' pipelines ------------------------------------------------------


def test_controlnet_without_masactrl_equals_diffusers_pipeline(engine, controlnet, tiny_checkpoint):
    image = layout_image(1)
    condition = Condition(controlnet, [image], scale=0.7, start=0.0, end=0.75)
    ours = engine.synthesize(
        target_prompts=["a cat running"], control=OFF, condition=condition, **SYNTHESIS
    )
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_checkpoint,
        controlnet=controlnet.model,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        "a cat running",
        image=image,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=engine.initial_noise(SYNTHESIS["seed"], 64, 64),
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.0,
        control_guidance_end=0.75,
        output_type="latent",
    ).images
    assert_close(ours.latents[1:], expected)
    plain = engine.synthesize(target_prompts=["a cat running"], control=OFF, **SYNTHESIS)
    assert effect(ours.latents[1:], plain.latents[1:]) > 20 * ATOL


def test_adapter_without_masactrl_equals_diffusers_pipeline(engine, adapter, tiny_checkpoint):
    image = layout_image(2)
    condition = Condition(adapter, [image], scale=0.8)
    ours = engine.synthesize(
        target_prompts=["a cat running"], control=OFF, condition=condition, **SYNTHESIS
    )
    pipeline = StableDiffusionAdapterPipeline.from_pretrained(
        tiny_checkpoint, adapter=adapter.model, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        "a cat running",
        image=image,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=engine.initial_noise(SYNTHESIS["seed"], 64, 64),
        adapter_conditioning_scale=0.8,
        output_type="latent",
    ).images
    assert_close(ours.latents[1:], expected)
    plain = engine.synthesize(target_prompts=["a cat running"], control=OFF, **SYNTHESIS)
    assert effect(ours.latents[1:], plain.latents[1:]) > 20 * ATOL


# -- MasaCtrl on: the explicit reference ----------------------------------------------------


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_conditioned_synthesis_equals_explicit_reference(engine, controlnet, adapter, kind):
    model = controlnet if kind == "controlnet" else adapter
    targets = ["a cat running", "a dog jumping"]
    condition = Condition(
        model, [layout_image(3), layout_image(4)], source_image=layout_image(5), scale=0.9
    )
    ours = engine.synthesize(
        target_prompts=targets, control=CONTROL, condition=condition, **SYNTHESIS
    )
    chunked = with_options(engine, max_batch=2).synthesize(
        target_prompts=targets, control=CONTROL, condition=condition, **SYNTHESIS
    )
    noise = engine.initial_noise(SYNTHESIS["seed"], 64, 64)
    expected = reference_denoise(engine, noise, "a cat sitting", targets, CONTROL, condition)
    assert_close(ours.latents, expected)
    assert_close(chunked.latents, expected)


def test_unconditioned_source_equals_the_unconditioned_run(engine, controlnet, adapter, photo):
    targets = ["a red house at night", "a blue house"]
    plain = engine.edit(photo, targets, steps=STEPS, control=CONTROL)
    for model in (controlnet, adapter):
        condition = Condition(model, [layout_image(6)])
        conditioned = engine.edit(photo, targets, steps=STEPS, control=CONTROL, condition=condition)
        assert_close(conditioned.latents[0], plain.latents[0])
        assert effect(conditioned.latents[1:], plain.latents[1:]) > 20 * ATOL
    noise = engine.initial_noise(3, 64, 64)
    synthesized = engine.synthesize(
        target_prompts=targets, control=CONTROL, condition=Condition(controlnet, [layout_image(6)]),
        **SYNTHESIS,
    )  # fmt: skip
    unconditioned = reference_denoise(engine, noise, "a cat sitting", targets, CONTROL)
    assert_close(synthesized.latents[0], unconditioned[0])


# -- each parameter matters -----------------------------------------------------------------


def test_scale_window_and_rows_each_change_the_images(engine, controlnet):
    targets = ["a cat running", "a dog jumping"]
    images = [layout_image(3), layout_image(4)]

    def run(**changes):
        condition = Condition(controlnet, changes.pop("images", images), **changes)
        return engine.synthesize(
            target_prompts=targets, control=CONTROL, condition=condition, **SYNTHESIS
        ).latents

    base = run()
    assert effect(run(scale=0.5), base) > 20 * ATOL
    assert effect(run(start=0.5), base) > 20 * ATOL
    assert effect(run(end=0.5), base) > 20 * ATOL
    swapped = run(images=images[::-1])
    assert effect(swapped[1], base[1]) > 20 * ATOL
    with_source = run(source_image=layout_image(5))
    assert effect(with_source[0], base[0]) > 20 * ATOL
    # The source's own condition reaches the targets only through mutual self-attention.
    shared = run(images=[images[0]])
    assert_close(shared[1], base[1])
    assert effect(shared[2], base[2]) > 20 * ATOL


# -- costs ----------------------------------------------------------------------------------


def test_condition_model_runs_only_on_conditioned_rows(engine, controlnet, adapter, photo):
    condition = Condition(controlnet, [layout_image(6)], start=0.0, end=0.5)
    kept = sum(controlnet_keep(STEPS, 0.0, 0.5))
    optimized = engine.edit(photo, ["a house"], steps=STEPS, control=CONTROL, condition=condition)
    plain = with_options(engine, share_source_branch=False, skip_redundant_guidance=False).edit(
        photo, ["a house"], steps=STEPS, control=CONTROL, condition=condition
    )
    # One target, two guidance halves: 2 ControlNet rows per kept step, however the source runs.
    assert optimized.stats.condition_evals == 2 * kept
    assert plain.stats.condition_evals == 2 * kept
    assert optimized.stats.unet_image_evals == STEPS + STEPS * 3
    assert plain.stats.unet_image_evals == STEPS + STEPS * 4
    assert_close(optimized.latents, plain.latents)
    targets = ["a cat running", "a dog jumping"]
    shared = engine.synthesize(
        target_prompts=targets, control=CONTROL, condition=Condition(adapter, [layout_image(3)]),
        **SYNTHESIS,
    )  # fmt: skip
    per_image = engine.synthesize(
        target_prompts=targets,
        control=CONTROL,
        condition=Condition(adapter, [layout_image(3)] * 2, source_image=layout_image(5)),
        **SYNTHESIS,
    )
    assert shared.stats.condition_evals == 1
    assert per_image.stats.condition_evals == 3
    synthesis = engine.synthesize(
        target_prompts=targets, control=CONTROL, condition=Condition(controlnet, [layout_image(3)]),
        **SYNTHESIS,
    )  # fmt: skip
    assert synthesis.stats.condition_evals == STEPS * 2 * len(targets)


# -- refusals -------------------------------------------------------------------------------


def test_bad_conditions_are_refused_before_sampling(engine, controlnet, photo):
    calls = []
    progress = lambda *args: calls.append(args)  # noqa: E731
    cases = [
        (Condition(controlnet, [layout_image(1)] * 3), "one condition image per target"),
        (Condition(controlnet, []), "one condition image per target"),
        (Condition(controlnet, [layout_image(1)], start=0.6, end=0.4), "0 <= start < end <= 1"),
        (Condition(controlnet, ["edges.png"]), "PIL images"),  # type: ignore[list-item]
    ]
    for condition, message in cases:
        with pytest.raises(InvalidInput, match=message):
            engine.edit(photo, ["a", "b"], steps=STEPS, condition=condition, progress=progress)
    with pytest.raises(InvalidInput, match="source is the inverted photo"):
        engine.edit(
            photo,
            ["a"],
            steps=STEPS,
            condition=Condition(controlnet, [layout_image(1)], source_image=layout_image(2)),
            progress=progress,
        )
    assert calls == []


def test_family_and_shape_mismatches_are_clear_errors(
    engine, controlnet_dir, tiny_sdxl_checkpoint, tmp_path
):
    sdxl = MasaCtrlEngine.from_pretrained(tiny_sdxl_checkpoint, device="cpu")
    with pytest.raises(InvalidInput, match="made for sd models, but the base model is sdxl"):
        sdxl.load_condition_model(controlnet_dir)
    from diffusers import UNet2DConditionModel

    from masactrl_core.tiny import SD_TINY_UNET_CONFIG

    wider = UNet2DConditionModel(**{**SD_TINY_UNET_CONFIG, "block_out_channels": (8, 16, 32, 64)})
    build_tiny_condition_model("controlnet", wider, "sd").save_pretrained(tmp_path / "cn")
    with pytest.raises(InvalidInput, match="block_out_channels"):
        engine.load_condition_model(tmp_path / "cn")
    build_tiny_condition_model("adapter", wider, "sd").save_pretrained(tmp_path / "ad")
    with pytest.raises(InvalidInput, match="channels"):
        engine.load_condition_model(tmp_path / "ad")
    # Made for a VAE that shrinks images 8 times (the real SD's), not the tiny one's 2.
    coarse = build_tiny_condition_model("controlnet", engine.unet, "sd", vae_scale_factor=8)
    coarse.save_pretrained(tmp_path / "coarse")
    with pytest.raises(InvalidInput, match="conditioning_embedding_out_channels"):
        engine.load_condition_model(tmp_path / "coarse")


def test_what_is_not_a_condition_model_is_a_load_error(engine, tmp_path):
    with pytest.raises(ModelLoadError, match="absent: no such folder or file"):
        engine.load_condition_model(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="is a UNet2DConditionModel, not a ControlNetModel"):
        engine.load_condition_model(f"{engine.model_name}/unet")
    with pytest.raises(ModelLoadError, match="is a folder without config.json"):
        engine.load_condition_model(tmp_path)
