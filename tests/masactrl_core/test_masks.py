"""Mask-guided MasaCtrl against explicit-softmax references of the same definitions.

The references below materialize every attention matrix and forbid (source token, target token)
pairs with -inf, on the authors' batch layout ([source, targets] in two guidance halves). They
re-derive grids, resize masks and aggregate cross-attention maps themselves; the engine's routing,
index selection, chunking and shared source branch must give the same latents.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from masactrl_core import ControlConfig, InvalidInput, MaskConfig
from masactrl_core.attention import CrossAttentionMapProcessor, MutualSelfAttentionProcessor
from masactrl_core.engine import MasaCtrlEngine, with_options
from masactrl_core.masks import WordMasks, binarize, crop_to_aspect, plan_regions, token_grid

STEPS = 4
CONTROL = ControlConfig(start_step=1, start_layer=10)
ATOL = 2e-4
SYNTHESIS = dict(source_prompt="a cat sitting", target_prompts=["a cat running"], seed=5)


# --- references ------------------------------------------------------------------------------


def grid_of(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The level whose halved latent has ``tokens`` tokens (independent of the engine's rule)."""
    height, width = latent_hw
    for level in range(6):
        h, w = height >> level, width >> level
        if h * w == tokens:
            return h, w
    raise AssertionError(f"no grid with {tokens} tokens")


def resize(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask[None, None].float(), size=grid, mode="nearest")[0, 0].flatten() > 0.5


def explicit_attention(attn, hidden_states, keys_from=None, allowed=None):
    """softmax(Q K^T / sqrt(d)) V with every matrix materialized; ``allowed`` (B, N, N) masks."""
    batch, tokens, _ = hidden_states.shape
    query, key, value = (
        proj(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)
        for proj in (attn.to_q, attn.to_k, attn.to_v)
    )
    if keys_from is not None:
        key, value = key[keys_from], value[keys_from]
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, tokens, -1)
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class ExplicitMaskedMasaCtrl:
    """MasaCtrl with masks, written out. ``regions(layer, grid, image)`` -> (source (G, N),
    target (G, N)) boolean region stacks with the background last, or ``None`` for unmasked."""

    latent_hw: tuple[int, int] = (32, 32)

    def __init__(self, layer, state):
        self.layer = layer
        self.state = state

    def regions(self, layer, grid, image):
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        assert encoder_hidden_states is None
        state = self.state
        if state.step not in state.controlled_steps or self.layer not in state.controlled_layers:
            return explicit_attention(attn, hidden_states)
        batch, tokens, _ = hidden_states.shape
        per_half = batch // 2
        source_of = torch.arange(batch) // per_half * per_half
        grid = grid_of(tokens, self.latent_hw)
        allowed = torch.ones(batch, tokens, tokens, dtype=torch.bool)
        for row in range(batch):
            image = row % per_half
            regions = None if image == 0 else self.regions(self.layer, grid, image)
            if regions is not None:
                source, target = regions
                # Target token i may read source token j iff some region holds both.
                allowed[row] = (target.T.float() @ source.float()) > 0
        return explicit_attention(attn, hidden_states, source_of, allowed)


def manual_reference(pairs, latent_hw=(32, 32)):
    """A reference class for manual masks given as (source, target) PIL images."""

    def binary(image):
        return torch.from_numpy(__import__("numpy").asarray(image.convert("L")) >= 128)

    sources = [binary(s) for s, _ in pairs]
    targets = [binary(t) for _, t in pairs]

    class Manual(ExplicitMaskedMasaCtrl):
        def regions(self, layer, grid, image):
            def stack(masks):
                regions = torch.stack([resize(m, grid) for m in masks])
                return torch.cat([regions, ~regions.any(0, keepdim=True)])

            return stack(sources), stack(targets)

    Manual.latent_hw = latent_hw
    return Manual


class Maps:
    """Cross-attention word maps of the current step, in execution order (the authors' list)."""

    step = None
    maps: list[torch.Tensor] = []


def automatic_reference(word_positions, threshold, latent_hw=(32, 32)):
    """Reference classes (self-attention, cross-attention) for automatic masks.

    ``word_positions[i]``: the token positions of the word in image i's prompt (0 = source).
    """
    quarter = (latent_hw[0] // 4, latent_hw[1] // 4)

    class CrossRecorder:
        def __init__(self, layer, state):
            self.state = state

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **_):
            batch, tokens, _ = hidden_states.shape
            assert tokens == quarter[0] * quarter[1], "recorder on a layer off the quarter grid"
            query = attn.to_q(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)
            key, value = (
                proj(encoder_hidden_states).view(batch, -1, attn.heads, query.shape[-1])
                for proj in (attn.to_k, attn.to_v)
            )
            key, value = key.transpose(1, 2), value.transpose(1, 2)
            probabilities = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1)
            if Maps.step != self.state.step:
                Maps.step, Maps.maps = self.state.step, []
            if self.state.step in self.state.controlled_steps:
                conditional = probabilities[batch // 2 :].mean(dim=1)  # heads averaged
                Maps.maps.append(
                    torch.stack(
                        [conditional[i][:, word_positions[i]].sum(-1) for i in range(batch // 2)]
                    )
                )
            out = (probabilities @ value).transpose(1, 2).reshape(batch, tokens, -1)
            return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    class Automatic(ExplicitMaskedMasaCtrl):
        def mask(self, image, grid):
            averaged = torch.stack(Maps.maps).mean(dim=0)[image]
            low, high = averaged.min(), averaged.max()
            normalized = (averaged - low) / (high - low) if high > low else averaged * 0
            return resize(normalized.view(quarter) >= threshold, grid)

        def regions(self, layer, grid, image):
            if Maps.step != self.state.step or not Maps.maps:
                return None
            source, target = self.mask(0, grid), self.mask(image, grid)
            source, target = torch.stack([source, ~source]), torch.stack([target, ~target])
            for s, t in zip(source, target, strict=True):
                if t.any() and not s.any():
                    return None
            return source, target

    Automatic.latent_hw = latent_hw
    return Automatic, CrossRecorder


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def plain(engine) -> MasaCtrlEngine:
    return with_options(engine, share_source_branch=False, skip_redundant_guidance=False)


def rectangles(size, boxes):
    """An L image of ``size`` with white rectangles at fractional ``boxes``."""
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    width, height = size
    for left, top, right, bottom in boxes:
        draw.rectangle([left * width, top * height, right * width - 1, bottom * height - 1], 255)
    return image


def reference_run(plain, processor, call, cross=None, **kwargs):
    reference = with_options(plain)
    reference.processor_class = processor
    if cross is not None:
        reference.cross_processor_class = cross
    return getattr(reference, call)(**kwargs)


def assert_close(actual, expected):
    difference = (actual - expected).abs().max().item()
    assert difference <= ATOL, f"max difference {difference:.2e} exceeds {ATOL:.0e}"


# --- manual masks ----------------------------------------------------------------------------


def test_manual_masks_equal_the_explicit_reference_and_change_the_images(engine, plain):
    # Masks at another resolution than the 64x64 images: binarized there, resized per grid.
    pair = (
        rectangles((128, 128), [(0.1, 0.2, 0.6, 0.9)]),
        rectangles((100, 100), [(0.3, 0.1, 0.9, 0.7)]),
    )
    masks = MaskConfig(regions=[pair])
    ours = engine.synthesize(steps=STEPS, control=CONTROL, masks=masks, **SYNTHESIS)
    expected = reference_run(
        plain,
        manual_reference([pair]),
        "synthesize",
        steps=STEPS,
        control=CONTROL,
        masks=masks,
        **SYNTHESIS,
    )
    assert_close(ours.latents, expected.latents)
    unmasked = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    assert (ours.latents[1] - unmasked.latents[1]).abs().max() > 20 * ATOL
    assert torch.equal(ours.latents[0], unmasked.latents[0])  # the source branch is unchanged
    assert set(ours.masks) == {"source_region_0", "target_0_region_0"}
    assert ours.masks["source_region_0"].size == (64, 64)


def test_multi_object_masks_on_a_non_square_grid_equal_the_reference(engine, plain):
    # 96x64 px -> 48x32 latents; the controlled grids are 24x16 and 48x32, not square.
    size = (192, 128)
    pairs = [
        (rectangles(size, [(0.0, 0.1, 0.4, 0.9)]), rectangles(size, [(0.55, 0.1, 1.0, 0.9)])),
        (rectangles(size, [(0.55, 0.2, 1.0, 1.0)]), rectangles(size, [(0.0, 0.0, 0.45, 0.8)])),
    ]
    kwargs = dict(
        source_prompt="a man and a woman",
        target_prompts=["a man and a woman smiling", "a man and a woman running"],
        seed=2,
        steps=STEPS,
        control=CONTROL,
        width=96,
        height=64,
        masks=MaskConfig(regions=pairs),
    )
    ours = with_options(engine, max_batch=3).synthesize(**kwargs)
    expected = reference_run(plain, manual_reference(pairs, (32, 48)), "synthesize", **kwargs)
    assert_close(ours.latents, expected.latents)
    one_region = engine.synthesize(**{**kwargs, "masks": MaskConfig(regions=pairs[:1])})
    assert (ours.latents[1:] - one_region.latents[1:]).abs().max() > 20 * ATOL
    assert len(ours.masks) == 2 + 2 * 2


def test_masked_edit_equals_the_reference(engine, plain):
    image = engine.synthesize("a red house", ["a red house"], seed=7, steps=3).source
    pair = (rectangles((64, 64), [(0.2, 0.2, 0.8, 0.8)]), rectangles((64, 64), [(0, 0, 0.5, 1)]))
    kwargs = dict(
        image=image,
        target_prompts=["a red house at night"],
        steps=STEPS,
        control=CONTROL,
        masks=MaskConfig(regions=[pair]),
    )
    ours = engine.edit(**kwargs)
    expected = reference_run(
        plain, manual_reference([pair]), "edit", inversion_guidance_scale=7.5, **kwargs
    )
    assert_close(ours.latents, expected.latents)


def test_full_foreground_masks_equal_unmasked_masactrl(engine):
    white = Image.new("L", (64, 64), 255)
    masked = engine.synthesize(
        steps=STEPS, control=CONTROL, masks=MaskConfig(regions=[(white, white)]), **SYNTHESIS
    )
    unmasked = engine.synthesize(steps=STEPS, control=CONTROL, **SYNTHESIS)
    assert_close(masked.latents, unmasked.latents)


class CountingProcessor(MutualSelfAttentionProcessor):
    """Counts the query tokens each controlled call attends for, per row."""

    calls: list[tuple[int, int]] = []  # (rows x query tokens attended, rows x tokens)

    def attend_regions(self, query, key, value, routing):
        attended = []
        original = self.attend

        def attend(q, k, v):
            attended.append(q.shape[0] * q.shape[2])
            return original(q, k, v)

        self.attend = attend
        try:
            return super().attend_regions(query, key, value, routing)
        finally:
            del self.attend
            CountingProcessor.calls.append((sum(attended), query.shape[0] * query.shape[2]))


def test_each_target_token_is_attended_once_full_foreground_runs_no_background(engine):
    counting = with_options(engine)
    counting.processor_class = CountingProcessor
    white = Image.new("L", (64, 64), 255)
    half = rectangles((64, 64), [(0, 0, 0.5, 1)])
    for target in (white, half):
        CountingProcessor.calls = []
        counting.synthesize(
            steps=2, control=CONTROL, masks=MaskConfig(regions=[(half, target)]), **SYNTHESIS
        )
        assert CountingProcessor.calls
        # Every query token of every row is computed exactly once: no attention is computed for
        # tokens that do not use it (a full-foreground target gets no background attention).
        assert all(done == total for done, total in CountingProcessor.calls)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ("overlap", "source masks 0 and 1 overlap"),
        ("empty source", "source mask 0 selects no"),
        ("empty background", "source background"),
        ("unpaired", "pair"),
    ],
)
def test_bad_manual_masks_fail_before_sampling(engine, regions, message):
    black, white = Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 255)
    left, right = rectangles((64, 64), [(0, 0, 0.6, 1)]), rectangles((64, 64), [(0.4, 0, 1, 1)])
    masks = {
        "overlap": [(left, left), (right, black)],
        "empty source": [(black, left)],
        "empty background": [(white, left)],
        "unpaired": [(left,)],
    }[regions]
    calls = []
    with pytest.raises(InvalidInput, match=message):
        engine.synthesize(
            steps=STEPS,
            control=CONTROL,
            masks=MaskConfig(regions=masks),
            progress=lambda *a: calls.append(a),
            **SYNTHESIS,
        )
    assert calls == []


def test_a_region_too_small_for_a_controlled_grid_is_refused(engine):
    # One latent pixel survives at 32x32 but vanishes at the 16x16 grid of blocks 10-12.
    tiny = Image.new("L", (64, 64), 0)
    tiny.putpixel((2, 2), 255)
    tiny.putpixel((3, 3), 255)
    target = rectangles((64, 64), [(0, 0, 0.5, 0.5)])
    with pytest.raises(InvalidInput, match="16x16 token grid of block 10"):
        engine.synthesize(
            steps=STEPS, control=CONTROL, masks=MaskConfig([(tiny, target)]), **SYNTHESIS
        )
    # Controlling only the 32x32 blocks, the same masks are fine.
    engine.synthesize(
        steps=2,
        control=ControlConfig(start_step=1, layers=[13, 14]),
        masks=MaskConfig([(tiny, target)]),
        **SYNTHESIS,
    )


# --- automatic masks -------------------------------------------------------------------------


def positions(engine, prompt, word):
    ids = engine.pipeline.tokenizer(prompt).input_ids
    (word_id,) = engine.pipeline.tokenizer(word, add_special_tokens=False).input_ids
    return [i for i, token in enumerate(ids) if token == word_id]


def test_automatic_masks_equal_the_explicit_reference(engine, plain):
    threshold = 0.4
    kwargs = dict(
        source_prompt="a photo of a cat",
        target_prompts=["a dog and a cat", "a cat on the grass"],
        seed=4,
        steps=STEPS,
        # Block 3 runs before any 8x8 map (unmasked); block 6 (4x4) and 8 read only the maps of
        # the blocks before them; 11 and 14 read all five.
        control=ControlConfig(start_step=1, layers=[3, 6, 8, 11, 14]),
        masks=MaskConfig(source_word="cat", target_word="cat", threshold=threshold),
    )
    words = [
        positions(engine, p, "cat") for p in [kwargs["source_prompt"], *kwargs["target_prompts"]]
    ]
    assert words == [[5], [5], [2]]
    ours = engine.synthesize(**kwargs)
    # Chunks [0, 3, 4], [1, 5, 2]: target 1's conditional row (all maps) runs before its
    # unconditional row, which must still read only the maps below each layer.
    chunked = with_options(engine, max_batch=3).synthesize(**kwargs)
    self_reference, cross_reference = automatic_reference(words, threshold)
    expected = reference_run(plain, self_reference, "synthesize", cross=cross_reference, **kwargs)
    assert_close(ours.latents, expected.latents)
    assert_close(chunked.latents, expected.latents)
    unmasked = engine.synthesize(**{**kwargs, "masks": None})
    assert (ours.latents[1:] - unmasked.latents[1:]).abs().max() > 20 * ATOL
    # The masks are real partitions: neither empty nor everything.
    for image in ours.masks.values():
        fraction = (torch.tensor(list(image.getdata())) > 0).float().mean()
        assert 0 < fraction < 1


def test_automatic_masks_read_the_quarter_grid_blocks(engine):
    plan = engine._prepare_masks(
        MaskConfig(source_word="cat", target_word="dog"),
        "a cat",
        ["a dog"],
        64,
        64,
        engine._resolve_control(CONTROL, STEPS),
    )
    # Tiny SD at 64 px: 32x32 latents; the 8x8 grid is down_blocks.2 and up_blocks.1.
    assert plan.map_grid == (8, 8)
    assert plan.map_blocks == (4, 5, 7, 8, 9)


class ConstantSourceMaps(CrossAttentionMapProcessor):
    """Records a constant map for the source image: its mask selects nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        for maps in self.state.masks.maps.values():
            if 0 in maps:
                maps[0] = torch.zeros_like(maps[0])
        return out


def test_automatic_masks_with_an_empty_source_region_fall_back_to_unmasked(engine):
    kwargs = dict(
        steps=STEPS,
        control=CONTROL,
        source_prompt="a photo of a cat",
        target_prompts=["a photo of a cat running"],
        seed=1,
    )
    fallback = with_options(engine)
    fallback.cross_processor_class = ConstantSourceMaps
    masked = fallback.synthesize(masks=MaskConfig(source_word="cat", target_word="cat"), **kwargs)
    unmasked = engine.synthesize(**kwargs)
    assert torch.isfinite(masked.latents).all()
    assert_close(masked.latents, unmasked.latents)


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (MaskConfig(source_word="horse", target_word="cat"), "source word 'horse' is not in"),
        (MaskConfig(source_word="cat", target_word="horse"), "target word 'horse' is not in"),
        (MaskConfig(source_word="cat", target_word=""), "both a source word and a target word"),
        (MaskConfig(source_word="cat", target_word="cat", threshold=2), "threshold"),
        (
            MaskConfig(regions=[(Image.new("L", (4, 4)),) * 2], source_word="cat"),
            "not both",
        ),
    ],
)
def test_bad_automatic_masks_are_invalid_input(engine, masks, message):
    with pytest.raises(InvalidInput, match=message):
        engine.synthesize(
            "a cat sitting", ["a cat running"], seed=0, steps=2, control=CONTROL, masks=masks
        )


def test_masks_are_checked_before_the_inversion(engine):
    calls = []
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InvalidInput, match="source word 'cat' is not in the source prompt ''"):
        engine.edit(
            image,
            ["a cat"],
            steps=2,
            masks=MaskConfig(source_word="cat", target_word="cat"),
            progress=lambda *a: calls.append(a),
        )
    assert calls == []


# --- the pieces ------------------------------------------------------------------------------


def test_binarize_crop_and_grid_helpers():
    assert binarize(Image.new("L", (3, 2), 128)).all()
    assert not binarize(Image.new("L", (3, 2), 127)).any()
    assert binarize(torch.tensor([[0.5, 0.49]])).tolist() == [[True, False]]
    assert binarize(torch.tensor([[255, 0]], dtype=torch.uint8)).tolist() == [[True, False]]
    wide = torch.zeros(10, 40, dtype=torch.bool)
    assert crop_to_aspect(wide, 64, 64).shape == (10, 10)
    assert crop_to_aspect(wide, 128, 64).shape == (10, 20)
    assert token_grid(24 * 16, (32, 48)) == (16, 24)
    assert token_grid(64, (32, 32)) == (8, 8)
    with pytest.raises(InvalidInput, match="2-D"):
        binarize(torch.zeros(2, 3, 4))


def test_plan_regions_refuses_a_target_region_without_source_tokens():
    source = torch.tensor([[False, False], [True, True]])
    assert plan_regions(source, torch.tensor([[True, False], [False, True]])) is None
    plan = plan_regions(source, torch.tensor([[False, False], [True, True]]))
    assert len(plan.groups) == 1 and plan.groups[0] == (None, None)


def test_word_masks_normalize_per_image_and_fall_back_on_constant_maps():
    masks = WordMasks(torch.zeros(2, 77), 0.5, (2, 2), (1,), 8, 8)
    masks.record(1, [0, 1], torch.tensor([[0.0, 1.0, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0]]))
    assert masks.plan(layer=1, grid=(2, 2), image=1) is None  # no map below block 1 yet
    # The target's constant map selects nothing: all its tokens read the source background.
    assert masks.plan(layer=2, grid=(2, 2), image=1).groups[0][0] is None
    masks.record(1, [0], torch.tensor([[5.0, 5.0, 5.0, 5.0]]))
    masks.record(1, [1], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    masks._cache.clear()
    assert masks.plan(layer=2, grid=(2, 2), image=1) is None  # target object, no source object
    masks.record(1, [0], torch.tensor([[0.0, 1.0, 2.0, 4.0]]))
    masks.record(1, [1], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    masks._cache.clear()
    plan = masks.plan(layer=2, grid=(2, 2), image=1)
    (fg_query, fg_key), (bg_query, bg_key) = plan.groups
    assert fg_key.tolist() == [2, 3] and fg_query.tolist() == [2, 3]
    assert bg_key.tolist() == [0, 1] and bg_query.tolist() == [0, 1]


def test_automatic_masks_need_cross_attention_on_the_quarter_grid(engine):
    # As a UNet whose transformer blocks all run at the latent resolution.
    flat = with_options(engine)
    flat.block_levels = [0] * engine.block_count
    with pytest.raises(InvalidInput, match="no cross-attention on the 8x8 token grid"):
        flat.synthesize(
            "a cat",
            ["a cat running"],
            seed=0,
            steps=2,
            masks=MaskConfig(source_word="cat", target_word="cat"),
        )
