"""Sequences: one source, K condition frames, K consistent frames.

Frame k must be exactly the target of a single-target run with condition frame k from the same
initial noise (and so the explicit reference of :mod:`test_conditions`), whatever the chunking;
the cost must be the issue's formulas: S × (2 + 2K) UNet images, S × (1 + 2K) when the source
prompt equals the negative prompt, and S × 2K ControlNet rows.
"""

from __future__ import annotations

import pytest

from masactrl_core import Condition, InvalidInput, MasaCtrlEngine
from masactrl_core.engine import with_options
from tests.masactrl_core.test_conditions import (
    ATOL,
    CONTROL,
    STEPS,
    assert_close,
    effect,
    layout_image,
    reference_denoise,
)

SOURCE = "a cat sitting"
TARGET = "a cat running"
FRAMES = [layout_image(3), layout_image(4), layout_image(5)]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def controlnet(engine, tiny_checkpoint, tmp_path_factory):
    from masactrl_core.tiny_conditions import write_tiny_condition_model

    folder = tmp_path_factory.mktemp("tiny-controlnet") / "model"
    write_tiny_condition_model(folder, kind="controlnet", base=tiny_checkpoint, seed=1)
    return engine.load_condition_model(folder)


@pytest.fixture(scope="module")
def sequence(engine, controlnet):
    decoded = []
    result = engine.sequence(
        SOURCE,
        TARGET,
        Condition(controlnet, FRAMES, scale=0.9),
        seed=3,
        steps=STEPS,
        control=CONTROL,
        on_frame=lambda index, image: decoded.append((index, image)),
    )
    return result, decoded


def test_each_frame_equals_its_single_target_run_and_the_reference(engine, controlnet, sequence):
    result, _ = sequence
    assert len(result.frames) == len(FRAMES)
    for k, frame in enumerate(FRAMES, start=1):
        alone = engine.synthesize(
            SOURCE,
            [TARGET],
            seed=3,
            steps=STEPS,
            control=CONTROL,
            condition=Condition(controlnet, [frame], scale=0.9),
        )
        assert_close(result.latents[[0, k]], alone.latents)
    noise = engine.initial_noise(3, 64, 64)
    condition = Condition(controlnet, FRAMES, scale=0.9)
    expected = reference_denoise(engine, noise, SOURCE, [TARGET] * 3, CONTROL, condition)
    assert_close(result.latents, expected)


def test_frames_keep_their_order_and_are_reported_as_decoded(sequence):
    result, decoded = sequence
    # Distinct layouts give distinct frames, so the per-frame equality above fixes the order.
    for a in range(3):
        for b in range(a + 1, 3):
            assert effect(result.latents[a + 1], result.latents[b + 1]) > 20 * ATOL
    assert [index for index, _ in decoded] == [0, 1, 2]
    assert [image.tobytes() for _, image in decoded] == [f.tobytes() for f in result.frames]


@pytest.mark.parametrize("max_batch", [2, 3])
def test_chunked_sequence_gives_the_same_frames(engine, controlnet, sequence, max_batch):
    result, _ = sequence
    chunked = with_options(engine, max_batch=max_batch).sequence(
        SOURCE,
        TARGET,
        Condition(controlnet, FRAMES, scale=0.9),
        seed=3,
        steps=STEPS,
        control=CONTROL,
    )
    assert_close(chunked.latents, result.latents)
    assert chunked.stats.unet_image_evals == result.stats.unet_image_evals
    assert chunked.stats.condition_evals == result.stats.condition_evals


def test_costs_follow_the_formulas(engine, controlnet, sequence):
    result, _ = sequence
    k = len(FRAMES)
    assert result.stats.unet_image_evals == STEPS * (2 + 2 * k)
    assert result.stats.condition_evals == STEPS * 2 * k
    # A source prompt equal to the negative prompt shares its two guidance halves.
    shared = with_options(engine, max_batch=3).sequence(
        "", TARGET, Condition(controlnet, FRAMES), seed=3, steps=STEPS, control=CONTROL
    )
    assert shared.stats.unet_image_evals == STEPS * (1 + 2 * k)
    assert shared.stats.condition_evals == STEPS * 2 * k


def test_one_prompt_per_frame_and_an_image_source(engine, controlnet):
    photo = engine.synthesize("a red house", ["a red house"], seed=7, steps=3).source
    prompts = ["a red house at night", "a blue house"]
    frames = FRAMES[:2]
    result = engine.sequence(
        "a red house", prompts, Condition(controlnet, frames), image=photo, steps=STEPS,
        control=CONTROL, anchor_source=True,
    )  # fmt: skip
    again = engine.sequence(
        "a red house", prompts, Condition(controlnet, frames), inverted=result.inverted,
        steps=STEPS, control=CONTROL, anchor_source=True,
    )  # fmt: skip
    assert_close(again.latents, result.latents)
    assert again.stats.unet_image_evals < result.stats.unet_image_evals  # no second inversion
    for k, (prompt, frame) in enumerate(zip(prompts, frames, strict=True), start=1):
        alone = engine.edit(
            photo, [prompt], source_prompt="a red house", steps=STEPS, control=CONTROL,
            condition=Condition(controlnet, [frame]), anchor_source=True,
        )  # fmt: skip
        assert_close(result.latents[[0, k]], alone.latents)


def test_bad_sequences_are_refused_before_sampling(engine, controlnet):
    calls = []
    progress = lambda *args: calls.append(args)  # noqa: E731
    limited = with_options(engine, max_sequence_frames=2)
    cases = [
        (limited, TARGET, FRAMES, "at most 2 condition frames, got 3"),
        (engine, TARGET, [], "at least one condition frame"),
        (engine, [TARGET, TARGET], FRAMES, "one target prompt for all frames or one per frame"),
    ]
    for runner, prompts, frames, message in cases:
        with pytest.raises(InvalidInput, match=message):
            runner.sequence(
                SOURCE, prompts, Condition(controlnet, frames), steps=STEPS, progress=progress
            )
    with pytest.raises(InvalidInput, match="anchor_source needs an image source"):
        engine.sequence(
            SOURCE, TARGET, Condition(controlnet, FRAMES), steps=STEPS, anchor_source=True
        )
    assert calls == []
