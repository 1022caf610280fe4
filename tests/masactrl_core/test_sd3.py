"""SD3 on the tiny SD3 checkpoint: StableDiffusion3Pipeline equivalence, the MM-DiT rule in both
guidance halves against an explicit-attention reference, parameters, inversion, refusals.

The reference processor is written from the rule with SD3's own token order ([image, text]):
projections and RMS norms written out, keys and values [source image, own text] where the
source is the same guidance half's source row, and a materialized softmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    StableDiffusion3Pipeline,
)

from masactrl_core import ControlConfig, InvalidInput, MaskConfig
from masactrl_core.engine import MasaCtrlEngine, with_options

STEPS = 4
SIZE = 64
GUIDANCE = 5.0
ATOL = 2e-4
SYNTHESIS = dict(
    source_prompt="a photo of a cat sitting",
    target_prompts=["a photo of a dog running"],
    seed=3,
    steps=STEPS,
    guidance_scale=GUIDANCE,
    width=SIZE,
    height=SIZE,
)
OFF = ControlConfig(start_step=STEPS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd3") / "model", family="sd3")


@pytest.fixture(scope="module")
def engine(checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)


def rms(x, norm):
    """SD3.5's RMS query/key norm written out; SD3-medium (and the tiny model) have none."""
    if norm is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


class ExplicitSD3MasaCtrl:
    """[uncond source, uncond targets, cond source, cond targets]: each half reads its source."""

    def __init__(self, layer, state):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        batch = hidden_states.shape[0]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = rms(q, attn.norm_q), rms(k, attn.norm_k)
        tq, tk, tv = (
            heads(p(encoder_hidden_states))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        tq, tk = rms(tq, attn.norm_added_q), rms(tk, attn.norm_added_k)
        image = q.shape[2]
        state = self.state
        if state.step in state.controlled_steps and self.layer in state.controlled_layers:
            per_half = batch // 2
            source_of = torch.arange(batch) // per_half * per_half
            k, v = k[source_of], v[source_of]
        query, key, value = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
        scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
        out = (scores.softmax(-1) @ value).transpose(1, 2).flatten(2)
        image_out, text_out = out[:, :image], out[:, image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out


def assert_close(actual, expected):
    difference = (actual - expected).abs().max().item()
    assert difference <= ATOL, f"max difference {difference:.2e} exceeds {ATOL:.0e}"


def pixels(image):
    return np.asarray(image, dtype=np.float32) / 255


def test_family_blocks_rows_and_defaults(engine):
    assert engine.family == "sd3" and engine.block_count == 3
    assert engine.layer_names == [f"transformer_blocks.{i}.attn.processor" for i in range(3)]
    assert engine.backbone.classifier_free_guidance and not engine.backbone.supports_conditions
    assert (engine.default_control.start_step, engine.default_control.start_layer) == (4, 2)
    assert engine.describe()["shift"] == {"dynamic": False, "shift": 3.0}
    plain = with_options(engine, share_source_branch=False)
    result = plain.synthesize(**{**SYNTHESIS, "target_prompts": ["a dog", "a car"]})
    assert result.stats.unet_image_evals == STEPS * 2 * 3  # 2(1 + N)


def test_disabled_control_equals_stable_diffusion_3_pipeline(engine, checkpoint):
    pipeline = StableDiffusion3Pipeline.from_pretrained(checkpoint)
    pipeline.set_progress_bar_config(disable=True)
    result = engine.synthesize(**{**SYNTHESIS, "control": OFF})
    common = dict(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        max_sequence_length=engine.backbone.max_sequence_length,
    )  # fmt: skip
    for index, prompt in enumerate([SYNTHESIS["source_prompt"], *SYNTHESIS["target_prompts"]]):
        latents = pipeline(
            prompt, generator=torch.Generator("cpu").manual_seed(3), output_type="latent", **common
        ).images
        assert_close(result.latents[index], latents[0])
        image = pipeline(
            prompt, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **common
        ).images[0]
        decoded = result.source if index == 0 else result.targets[0]
        assert float(np.abs(pixels(decoded) - image).max()) <= 1 / 255


@pytest.mark.parametrize(
    "control", [ControlConfig(start_step=1, start_layer=1), ControlConfig(start_step=0, layers=[0])]
)
def test_control_equals_the_explicit_reference(engine, control):
    kwargs = {**SYNTHESIS, "target_prompts": ["a photo of a dog running", "a red car"]}
    ours = engine.synthesize(**kwargs, control=control)
    reference = with_options(engine, share_source_branch=False, skip_redundant_guidance=False)
    reference.processor_class = ExplicitSD3MasaCtrl
    assert_close(ours.latents, reference.synthesize(**kwargs, control=control).latents)
    off = engine.synthesize(**kwargs, control=OFF)
    assert_close(ours.latents[0], off.latents[0])
    # The control moves the target's pixels far beyond the 1/255 tolerance.
    moved = float(np.abs(pixels(ours.targets[0]) - pixels(off.targets[0])).max())
    assert moved > 5 / 255


def test_start_step_and_layer_move_the_images(engine):
    def target(control):
        return pixels(engine.synthesize(**SYNTHESIS, control=control).targets[0])

    base = target(ControlConfig(start_step=0, start_layer=0))
    for control in (
        ControlConfig(start_step=2, start_layer=0),
        ControlConfig(start_step=0, start_layer=2),
    ):
        difference = np.abs(target(control) - base)
        print(control, float(difference.mean()) * 255, float(difference.max()) * 255)
        assert float(difference.max()) > 5 / 255, control


def test_inversion_round_trip_and_refusals(engine):
    photo = engine.synthesize(
        "a red house", ["a red house"], seed=7, steps=6, width=SIZE, height=SIZE
    ).source
    with torch.inference_mode():
        clean = engine._encode_image(photo, SIZE, SIZE)[0]
    errors = {}
    for steps in (8, 32):
        result = engine.edit(
            photo, ["a red house"], source_prompt="a red house", steps=steps, width=SIZE,
            height=SIZE, guidance_scale=1.0, control=ControlConfig(start_step=steps),
        )  # fmt: skip
        errors[steps] = (result.latents[0] - clean).abs().mean().item()
    print(f"SD3 Euler inversion: reconstruction latent L1 {errors}")
    assert errors[32] < errors[8] / 2
    with pytest.raises(InvalidInput, match="no cross-attention"):
        engine.synthesize(**SYNTHESIS, masks=MaskConfig(source_word="cat", target_word="dog"))
