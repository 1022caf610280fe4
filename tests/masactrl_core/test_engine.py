"""The engine against independent definitions: explicit-softmax MasaCtrl, DDIM, plain paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from masactrl_core import ControlConfig, InvalidInput, InvertedImage, JobCancelled, MasaCtrlEngine
from masactrl_core.attention import MutualAttentionState
from masactrl_core.engine import with_options

STEPS = 6
CONTROL = ControlConfig(start_step=1, start_layer=10)
# Float32 on CPU: batching and kernel choice move results by ~1e-6; MasaCtrl moves them by ~1e-2.
ATOL = 2e-4


class ExplicitSoftmaxMasaCtrl:
    """The paper's definition written out: softmax(Q K_src^T / sqrt(d)) V_src for every image.

    Assumes the authors' batch layout, [source, targets...] in each of two guidance halves, which
    the engine uses when its optimizations are off and guidance is on.
    """

    halves = 2

    def __init__(self, layer: int, state: MutualAttentionState) -> None:
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        assert encoder_hidden_states is None
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        query, key, value = (
            proj(hidden_states).view(batch, tokens, heads, -1).transpose(1, 2)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        step = self.state.step
        if step in self.state.controlled_steps and self.layer in self.state.controlled_layers:
            per_half = batch // self.halves
            source_of = torch.arange(batch) // per_half * per_half
            key, value = key[source_of], value[source_of]
        scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
        out = scores.softmax(dim=-1) @ value
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def plain(engine) -> MasaCtrlEngine:
    return with_options(engine, share_source_branch=False, skip_redundant_guidance=False)


@pytest.fixture(scope="module")
def source_image(engine):
    return engine.synthesize("a red house", ["a red house"], seed=7, steps=4).source


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= ATOL, f"max difference {difference:.2e} exceeds {ATOL:.0e}"


def control_effect(engine, **kwargs) -> float:
    on = engine.synthesize(control=CONTROL, **kwargs).latents
    off = engine.synthesize(control=ControlConfig(steps=[]), **kwargs).latents
    return (on[1:] - off[1:]).abs().max().item()


def default_processors_only(engine) -> bool:
    return all(isinstance(p, AttnProcessor2_0) for p in engine.unet.attn_processors.values())


SYNTHESIS = dict(
    source_prompt="a cat sitting", target_prompts=["a cat running", "a dog jumping"], seed=3
)


def test_control_changes_targets_far_beyond_the_tolerance(engine):
    assert control_effect(engine, steps=STEPS, **SYNTHESIS) > 20 * ATOL


def test_sdpa_synthesis_equals_explicit_softmax_reference(engine, plain):
    ours = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    reference = with_options(plain)
    reference.processor_class = ExplicitSoftmaxMasaCtrl
    expected = reference.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    assert_close(ours.latents, expected.latents)


def test_sdpa_edit_equals_explicit_softmax_reference(engine, plain, source_image):
    kwargs = dict(target_prompts=["a red house at night"], steps=STEPS, control=CONTROL)
    ours = engine.edit(source_image, **kwargs)
    reference = with_options(plain)
    reference.processor_class = ExplicitSoftmaxMasaCtrl
    expected = reference.edit(source_image, inversion_guidance_scale=7.5, **kwargs)
    assert_close(ours.latents, expected.latents)
    assert (ours.latents[1] - ours.latents[0]).abs().max() > 20 * ATOL


def test_disabled_control_equals_plain_ddim_sampling(engine, tiny_checkpoint):
    result = engine.synthesize(steps=STEPS, control=ControlConfig(start_step=STEPS), **SYNTHESIS)
    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    noise = engine.initial_noise(SYNTHESIS["seed"], *engine.native_size)
    for index, prompt in enumerate(SYNTHESIS["target_prompts"], start=1):
        expected = pipeline(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=noise,
            output_type="latent",
        ).images
        assert_close(result.latents[index : index + 1], expected)


def test_source_never_depends_on_the_control(engine):
    on = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    off = engine.synthesize(steps=STEPS, control=ControlConfig(steps=[]), **SYNTHESIS)
    layers = engine.synthesize(steps=STEPS, control=ControlConfig(layers=[0, 6, 15]), **SYNTHESIS)
    assert torch.equal(on.latents[0], off.latents[0])
    assert torch.equal(on.latents[0], layers.latents[0])
    assert (on.latents[1:] - off.latents[1:]).abs().max() > 20 * ATOL


def test_optimized_edit_equals_plain_edit_and_counts_unet_images(engine, plain, source_image):
    targets = ["a red house in snow", "a blue house"]
    kwargs = dict(target_prompts=targets, steps=STEPS, control=CONTROL)
    expected = plain.edit(source_image, inversion_guidance_scale=7.5, **kwargs)
    optimized = engine.edit(source_image, inversion_guidance_scale=7.5, **kwargs)
    chunked = with_options(engine, max_batch=2).edit(source_image, **kwargs)
    n = len(targets)
    assert expected.stats.unet_image_evals == 2 * STEPS + STEPS * (2 + 2 * n)
    assert optimized.stats.unet_image_evals == STEPS + STEPS * (1 + 2 * n)
    assert chunked.stats.unet_image_evals == STEPS + STEPS * (1 + 2 * n)
    assert_close(optimized.inverted.latents, expected.inverted.latents)
    assert_close(optimized.latents, expected.latents)
    assert_close(chunked.latents, expected.latents)


def test_multi_target_batch_equals_one_target_at_a_time(engine):
    together = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    for index, prompt in enumerate(SYNTHESIS["target_prompts"], start=1):
        alone = engine.synthesize(
            SYNTHESIS["source_prompt"], [prompt], seed=3, steps=STEPS, control=CONTROL
        )
        assert_close(together.latents[[0, index]], alone.latents)


def test_chunked_synthesis_with_distinct_guidance_halves_equals_one_batch(engine):
    one_batch = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    chunked = with_options(engine, max_batch=3).synthesize(
        steps=STEPS, control=CONTROL, **SYNTHESIS
    )
    assert_close(chunked.latents, one_batch.latents)
    assert chunked.stats.unet_image_evals == one_batch.stats.unet_image_evals == STEPS * 6


def test_cached_inversion_skips_inversion_and_gives_the_same_edit(engine, source_image):
    first = engine.edit(source_image, ["a red house at dusk"], steps=STEPS, control=CONTROL)
    restored = InvertedImage.from_safetensors_bytes(first.inverted.to_safetensors_bytes())
    second = engine.edit(
        source_image, ["a red house at dusk"], steps=STEPS, control=CONTROL, inverted=restored
    )
    assert_close(second.latents, first.latents)
    assert second.stats.unet_image_evals == first.stats.unet_image_evals - STEPS
    assert second.stats.inversion_seconds == 0.0


def test_same_seed_same_images_and_the_noise_contract(engine):
    first = engine.synthesize(steps=3, **SYNTHESIS)
    second = engine.synthesize(steps=3, **SYNTHESIS)
    assert np.array_equal(np.asarray(first.targets[0]), np.asarray(second.targets[0]))
    width, height = engine.native_size
    expected = torch.randn(
        (1, 4, height // 2, width // 2), generator=torch.Generator("cpu").manual_seed(11)
    )
    assert torch.equal(engine.initial_noise(11, width, height), expected)


def test_progress_reports_every_step_of_both_phases(engine, source_image):
    calls = []
    engine.edit(source_image, ["a house"], steps=3, progress=lambda *a: calls.append(a))
    assert calls == [("invert", i, 3) for i in (1, 2, 3)] + [("denoise", i, 3) for i in (1, 2, 3)]


def test_cancellation_stops_promptly_and_restores_processors(engine):
    polls = []

    def cancel_on_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(JobCancelled):
        engine.synthesize(steps=STEPS, should_cancel=cancel_on_third_poll, **SYNTHESIS)
    assert len(polls) == 3
    assert default_processors_only(engine)
    engine.synthesize(steps=2, **SYNTHESIS)
    assert default_processors_only(engine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"control": ControlConfig(start_layer=16)}, "between 0 and 15"),
        ({"control": ControlConfig(start_step=-1)}, "between 0 and 6"),
        ({"control": ControlConfig(start_step=7)}, "between 0 and 6"),
        ({"control": ControlConfig(layers=[3, 99])}, "between 0 and 15"),
        ({"width": 70}, "multiple of 16"),
        ({"height": 0}, "multiple of 16"),
        ({"target_prompts": []}, "between 1 and 8 target prompts"),
        ({"target_prompts": ["x"] * 9}, "between 1 and 8 target prompts"),
        ({"steps": 0}, "steps must be between"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_valid_range(engine, kwargs, message):
    arguments = {**SYNTHESIS, "steps": STEPS, **kwargs}
    with pytest.raises(InvalidInput, match=message):
        engine.synthesize(**arguments)


def test_the_library_fallback_control_is_the_papers_depth_of_this_unet(engine):
    # control=None: start step 4 and layer 10 of 16 at the same depth of any UNet, no family table.
    assert engine.block_count == 16
    assert (engine.default_control.start_step, engine.default_control.start_layer) == (4, 10)
    assert engine._resolve_control(None, 2) == (frozenset(), frozenset(range(10, 16)))


def _declaring_copy(checkpoint, folder, declaration: str):
    import shutil

    shutil.copytree(checkpoint, folder)
    (folder / "masactrl.json").write_text(declaration)
    return folder


def test_checkpoint_declares_its_default_control(tiny_checkpoint, tmp_path):
    from masactrl_core import ModelLoadError

    folder = _declaring_copy(tiny_checkpoint, tmp_path / "a", '{"start_step": 2, "start_layer": 3}')
    engine = MasaCtrlEngine.from_pretrained(folder, device="cpu")
    assert (engine.default_control.start_step, engine.default_control.start_layer) == (2, 3)
    undeclared = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    assert undeclared.default_control.start_layer != 3  # the depth rule, not the declaration
    too_deep = f'{{"start_step": 4, "start_layer": {engine.block_count}}}'
    with pytest.raises(ModelLoadError, match="self-attention blocks"):
        MasaCtrlEngine.from_pretrained(_declaring_copy(tiny_checkpoint, tmp_path / "b", too_deep))
    with pytest.raises(ModelLoadError, match="must be a JSON object"):
        MasaCtrlEngine.from_pretrained(_declaring_copy(tiny_checkpoint, tmp_path / "c", "[1]"))
    with pytest.raises(ModelLoadError, match="integer start_step"):
        MasaCtrlEngine.from_pretrained(
            _declaring_copy(tiny_checkpoint, tmp_path / "d", '{"start_step": 4}')
        )


def test_a_declared_vocabulary_warns_about_other_words(tiny_checkpoint, tmp_path):
    from masactrl_core import ModelLoadError

    declaration = '{"vocabulary": ["a", "creature", "on", "grass", "snow"]}'
    folder = _declaring_copy(tiny_checkpoint, tmp_path / "a", declaration)
    engine = MasaCtrlEngine.from_pretrained(folder, device="cpu")
    prompts = [
        ("source_prompt", "A creature on grass."),
        ("target_prompts[0]", "a house and a Cat on snow, 2 cats"),
        ("negative_prompt", ""),
    ]
    assert engine.prompt_warnings(prompts) == [
        "target_prompts[0]: the model does not know the words 'house', 'and', 'cat', 'cats'; "
        "it was trained on 5 words: a, creature, grass, on, snow, so the picture may not show "
        "what the prompt asks"
    ]
    assert engine.prompt_warnings(prompts[:1]) == []
    # The control is still the depth rule's: the file declares a vocabulary only.
    undeclared = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    assert engine.default_control == undeclared.default_control
    assert undeclared.vocabulary is None
    assert undeclared.prompt_warnings(prompts) == []
    bad = _declaring_copy(tiny_checkpoint, tmp_path / "b", '{"vocabulary": "a creature"}')
    with pytest.raises(ModelLoadError, match="vocabulary must be a list of words"):
        MasaCtrlEngine.from_pretrained(bad, device="cpu")
