"""Single-file checkpoints: the tiny model as one original-layout file loads to the same model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from masactrl_core import ControlConfig, ModelLoadError
from masactrl_core.engine import MasaCtrlEngine
from masactrl_core.single_file import inspect_checkpoint, is_single_file

SYNTHESIS = dict(source_prompt="a cat sitting", target_prompts=["a cat running"], seed=3, steps=4)
CONTROL = ControlConfig(start_step=1, start_layer=10)


@pytest.fixture(scope="module")
def folder_engine(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def file_engine(tiny_single_file) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_single_file(
        tiny_single_file.file, config=str(tiny_single_file.config), family="sd", device="cpu"
    )


def test_the_file_is_in_the_original_layout_and_holds_every_weight(tiny_single_file):
    keys = load_file(tiny_single_file.file).keys()
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not list(tiny_single_file.config.rglob("*.safetensors"))  # weights come from the file
    info = inspect_checkpoint(tiny_single_file.file)
    assert (info.family, info.generation, info.v_prediction_marker) == ("sd", "sd1", False)


def test_single_file_weights_equal_the_folder_it_came_from(folder_engine, file_engine):
    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(folder_engine.pipeline, component).state_dict()
        actual = getattr(file_engine.pipeline, component).state_dict()
        assert actual.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{component}.{key} differs"


def test_single_file_gives_the_same_images_as_the_folder(folder_engine, file_engine):
    expected = folder_engine.synthesize(**SYNTHESIS, control=CONTROL)
    actual = file_engine.synthesize(**SYNTHESIS, control=CONTROL)
    assert torch.equal(actual.latents, expected.latents)
    assert file_engine.family == "sd" and file_engine.block_count == 16
    assert file_engine.prediction_type == "epsilon"


def test_from_pretrained_takes_a_file_too(tiny_single_file):
    assert is_single_file(tiny_single_file.file) and not is_single_file("owner/name")
    # Without a config a load would fetch the family's reference config; with one, it is offline.
    engine = MasaCtrlEngine.from_single_file(
        tiny_single_file.file, config=str(tiny_single_file.config), device="cpu"
    )
    assert engine.model_name == str(tiny_single_file.file)


def test_v_prediction_declared_or_detected(tiny_single_file, tmp_path):
    declared = MasaCtrlEngine.from_single_file(
        tiny_single_file.file,
        config=str(tiny_single_file.config),
        prediction_type="v_prediction",
        device="cpu",
    )
    assert declared.prediction_type == "v_prediction"
    marked = tmp_path / "v.safetensors"
    save_file({**load_file(tiny_single_file.file), "v_pred": torch.zeros(0)}, str(marked))
    assert inspect_checkpoint(marked).v_prediction_marker
    detected = MasaCtrlEngine.from_single_file(
        marked, config=str(tiny_single_file.config), device="cpu"
    )
    assert detected.prediction_type == "v_prediction"


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="model.safetensors is not a safetensors checkpoint"):
        MasaCtrlEngine.from_single_file(junk, device="cpu")
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion, FLUX.1 or SD3 checkpoint"):
        MasaCtrlEngine.from_single_file(other, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        MasaCtrlEngine.from_single_file(tmp_path / "missing.safetensors", device="cpu")


def test_a_family_mismatch_is_refused(tiny_single_file, tmp_path):
    with pytest.raises(ModelLoadError, match="tiny.safetensors is an sd checkpoint, but it is"):
        MasaCtrlEngine.from_single_file(tiny_single_file.file, family="sdxl", device="cpu")
    sdxl_config = tmp_path / "sdxl-config"
    shutil.copytree(tiny_single_file.config, sdxl_config)
    index = json.loads((sdxl_config / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (sdxl_config / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="is for sdxl models, but tiny.safetensors is sd"):
        MasaCtrlEngine.from_single_file(
            tiny_single_file.file, config=str(sdxl_config), device="cpu"
        )


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_single_file, tmp_path, folder_engine):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_single_file.file)}, ckpt)
    with pytest.raises(ModelLoadError, match="pickle checkpoint, which can run arbitrary code"):
        MasaCtrlEngine.from_single_file(ckpt, config=str(tiny_single_file.config), device="cpu")
    allowed = MasaCtrlEngine.from_single_file(
        ckpt, config=str(tiny_single_file.config), allow_pickle=True, device="cpu"
    )
    expected = folder_engine.synthesize(**SYNTHESIS)
    assert torch.equal(allowed.synthesize(**SYNTHESIS).latents, expected.latents)


@pytest.mark.parametrize(
    ("text_keys", "family", "generation"),
    [
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "sd", "sd1"),
        (["cond_stage_model.model.token_embedding.weight"], "sd", "sd2"),
        (
            [
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.positional_embedding",
            ],
            "sdxl",
            "sdxl",
        ),
    ],
)
def test_the_family_is_read_from_the_keys(tmp_path, text_keys, family, generation):
    path = tmp_path / "model.safetensors"
    keys = ["model.diffusion_model.out.2.weight", "first_stage_model.quant_conv.weight"]
    save_file({key: torch.zeros(1) for key in [*keys, *text_keys]}, str(path))
    info = inspect_checkpoint(path)
    assert (info.family, info.generation) == (family, generation)
    other = "sd" if family == "sdxl" else "sdxl"
    with pytest.raises(ModelLoadError, match=f"is an {family} checkpoint, but it is declared"):
        MasaCtrlEngine.from_single_file(path, family=other, device="cpu")


def test_an_sdxl_refiner_is_refused(tmp_path):
    path = tmp_path / "refiner.safetensors"
    keys = ["model.diffusion_model.out.2.weight", "first_stage_model.quant_conv.weight"]
    keys.append("conditioner.embedders.0.model.text_projection")
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    with pytest.raises(ModelLoadError, match="is an SDXL refiner"):
        inspect_checkpoint(path)
