"""LoRA adapters: a run with adapters equals the base model with them fused by hand; none leave
residue; they compose with MasaCtrl's processors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from masactrl_core import ControlConfig, InvalidInput, ModelLoadError
from masactrl_core.engine import MasaCtrlEngine

STEPS = 4
CONTROL = ControlConfig(start_step=1, start_layer=10)  # MasaCtrl on, in the decoder
SYNTHESIS = dict(
    source_prompt="a cat sitting", target_prompts=["a cat running"], seed=3, steps=STEPS
)
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tiny_loras) -> MasaCtrlEngine:
    engine = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    for name, lora in tiny_loras.items():
        engine.loras.load(name, lora.file if name == "style" else lora.path)
    return engine


@pytest.fixture(scope="module")
def fresh(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


def fused_by_hand(checkpoint, loras: dict) -> MasaCtrlEngine:
    """A fresh engine whose Linear weights get W + weight * alpha / rank * B @ A per adapter."""
    engine = MasaCtrlEngine.from_pretrained(checkpoint, device="cpu")
    components = {"unet": engine.unet, "text_encoder": engine.pipeline.text_encoder}
    for info, weight in loras:
        tensors = load_file(info.file)
        for key, down in tensors.items():
            if ".lora_A." not in key:
                continue
            component, _, module = key.removesuffix(".lora_A.weight").partition(".")
            up = tensors[key.replace(".lora_A.", ".lora_B.")]
            linear = components[component].get_submodule(module)
            with torch.no_grad():
                linear.weight += weight * info.scale * (up @ down)
    return engine


def run(engine: MasaCtrlEngine) -> torch.Tensor:
    return engine.synthesize(**SYNTHESIS, control=CONTROL).latents


def test_adapters_are_random_and_cover_the_text_encoder(tiny_loras):
    style = load_file(tiny_loras["style"].file)
    assert any(key.startswith("text_encoder.") for key in style)
    assert all(tensor.abs().sum() > 0 for key, tensor in style.items() if ".lora_B." in key)
    assert not any(key.startswith("text_encoder.") for key in load_file(tiny_loras["pose"].file))


def test_loading_adapters_changes_nothing_until_they_are_active(engine, fresh):
    assert engine.loras.names == ["style", "pose"] and engine.loras.active == {}
    assert torch.equal(run(engine), run(fresh))


def test_one_adapter_at_a_weight_equals_it_fused_by_hand(engine, tiny_checkpoint, tiny_loras):
    with engine.loras.activated({"style": 0.6}):
        assert engine.loras.active == {"style": 0.6}
        actual = run(engine)
    expected = run(fused_by_hand(tiny_checkpoint, [(tiny_loras["style"], 0.6)]))
    assert (actual - expected).abs().max().item() < ATOL
    assert (actual - run(engine)).abs().max().item() > 100 * ATOL  # the adapter matters


def test_two_adapters_with_their_weights_equal_both_fused(engine, tiny_checkpoint, tiny_loras):
    with engine.loras.activated({"style": 0.5, "pose": -1.2}):
        actual = run(engine)
    expected = run(
        fused_by_hand(tiny_checkpoint, [(tiny_loras["style"], 0.5), (tiny_loras["pose"], -1.2)])
    )
    assert (actual - expected).abs().max().item() < ATOL


def test_switching_adapters_leaves_no_residue(engine, fresh):
    with engine.loras.activated({"style": 1.0}):
        style_first = run(engine)
    with engine.loras.activated({"pose": 1.0}):
        pose = run(engine)
    with engine.loras.activated({"style": 1.0}):
        style_again = run(engine)
    assert torch.equal(style_first, style_again)
    assert not torch.equal(style_first, pose)
    # A run without adapters after runs with them equals a freshly loaded engine, bit for bit.
    assert torch.equal(run(engine), run(fresh))


def test_adapters_are_deactivated_when_a_run_fails(engine, fresh):
    with pytest.raises(InvalidInput), engine.loras.activated({"style": 1.0}):
        engine.synthesize("a", ["b"], seed=0, steps=0)
    assert engine.loras.active == {}
    assert torch.equal(run(engine), run(fresh))


def test_editing_uses_the_adapters_in_inversion_and_denoising(engine, fresh):
    image = fresh.synthesize("a red house", ["a red house"], seed=7, steps=3).source
    plain = fresh.edit(image, ["a blue house"], steps=STEPS, control=CONTROL)
    with engine.loras.activated({"style": 0.8}):
        styled = engine.edit(image, ["a blue house"], steps=STEPS, control=CONTROL)
    assert not torch.equal(styled.inverted.latents, plain.inverted.latents)
    assert not torch.equal(styled.latents, plain.latents)


def test_bad_adapter_requests_are_sentences(engine, tmp_path):
    with pytest.raises(InvalidInput, match="LoRA 'nope' is not loaded; loaded: style, pose"):
        engine.loras.activate({"nope": 1.0})
    with pytest.raises(InvalidInput, match="at most 4 LoRA adapters"):
        engine.loras.activate({f"n{i}": 1.0 for i in range(5)})
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="pickle file"):
        engine.loras.load("old", pickle)
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.loras.load("gone", tmp_path / "missing")
    assert engine.loras.active == {}


@pytest.fixture()
def pickled_style(tiny_loras, tmp_path):
    """The ``style`` adapter saved as diffusers' pickle name, with no safetensors beside it."""
    folder = tmp_path / "style-bin"
    folder.mkdir()
    torch.save(load_file(tiny_loras["style"].file), folder / "pytorch_lora_weights.bin")
    return folder


def test_a_folder_holding_only_a_pickle_is_refused_with_the_file_named(engine, pickled_style):
    with pytest.raises(ModelLoadError) as refused:
        engine.loras.load("refused", pickled_style)
    assert str(refused.value).startswith(
        "LoRA refused: style-bin/pytorch_lora_weights.bin is a pickle file, which can run "
        "arbitrary code when loaded"
    )
    assert "refused" not in engine.loras.names


def test_an_allowed_pickle_adapter_equals_its_safetensors_twin(engine, pickled_style, tiny_loras):
    engine.loras.load("style_bin", pickled_style, allow_pickle=True)
    # A pickle has no header for the adapter's alpha, so peft takes alpha = rank: the same
    # adapter at its safetensors scale needs weight * alpha / rank.
    with engine.loras.activated({"style_bin": 0.7 * tiny_loras["style"].scale}):
        from_pickle = run(engine)
    with engine.loras.activated({"style": 0.7}):
        from_safetensors = run(engine)
    torch.testing.assert_close(from_pickle, from_safetensors, rtol=0, atol=ATOL)
    with engine.loras.activated({}):
        assert not torch.allclose(run(engine), from_pickle, atol=ATOL)
