"""Single-file FLUX.1 and SD3 transformers: recognized by their keys, loaded by diffusers'
``from_single_file`` with the other components from a config folder, refused when mismatched.

The files are the tiny transformers written in the original layouts
(:func:`~masactrl_core.tiny_single_file.write_transformer_single_file`). diffusers 0.42.1 converts
the tiny SD3 file exactly; its FLUX conversion splits a single-stream block's fused ``linear1``
at FLUX.1's full width (3072 and 12288 rows), so no FLUX file narrower than FLUX.1 loads
(``test_the_flux_file_is_diffusers_own_layout``); the FLUX layout is checked at FLUX.1's width on
a two-block transformer instead (``slow``, ~10 s).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from masactrl_core import ControlConfig, ModelLoadError
from masactrl_core.engine import MasaCtrlEngine
from masactrl_core.single_file import inspect_checkpoint
from masactrl_core.tiny_single_file import write_transformer_single_file

SYNTHESIS = dict(
    source_prompt="a photo of a cat sitting",
    target_prompts=["a photo of a dog running"],
    seed=3,
    steps=3,
    width=64,
    height=64,
)
CONTROL = ControlConfig(start_step=1, start_layer=1)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd3") / "model", family="sd3")


@pytest.fixture(scope="module")
def sd3_file(sd3_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-file") / "tiny-sd3.safetensors"
    return write_transformer_single_file(sd3_folder, out, family="sd3")


@pytest.fixture(scope="module")
def flux_file(tiny_flux_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux-file") / "tiny-flux.safetensors"
    return write_transformer_single_file(tiny_flux_checkpoint, out, family="flux")


def test_the_files_are_in_the_original_layouts(sd3_file, flux_file):
    sd3_keys = load_file(sd3_file).keys()
    assert "model.diffusion_model.joint_blocks.2.context_block.attn.qkv.weight" in sd3_keys
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.bias" in sd3_keys
    assert not [key for key in sd3_keys if "transformer_blocks" in key]
    flux_keys = load_file(flux_file).keys()
    assert {"img_in.weight", "txt_in.weight", "guidance_in.in_layer.bias"} <= flux_keys
    assert {"double_blocks.1.img_attn.qkv.weight", "single_blocks.1.linear1.weight"} <= flux_keys
    assert "double_blocks.0.txt_attn.norm.key_norm.scale" in flux_keys
    assert not [key for key in flux_keys if "transformer_blocks" in key]
    assert inspect_checkpoint(sd3_file).generation == "sd3"
    assert (inspect_checkpoint(flux_file).family, inspect_checkpoint(flux_file).generation) == (
        "flux",
        "flux-dev",
    )


def test_the_sd3_file_gives_the_same_transformer_and_images_as_the_folder(sd3_folder, sd3_file):
    folder = MasaCtrlEngine.from_pretrained(sd3_folder, device="cpu")
    single = MasaCtrlEngine.from_single_file(
        sd3_file, config=str(sd3_folder), family="sd3", device="cpu"
    )
    assert single.family == "sd3" and single.model_name == str(sd3_file)
    expected = folder.pipeline.transformer.state_dict()
    actual = single.pipeline.transformer.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), f"transformer.{key} differs"
    reference = folder.synthesize(**SYNTHESIS, control=CONTROL)
    result = single.synthesize(**SYNTHESIS, control=CONTROL)
    assert torch.equal(result.latents, reference.latents)


def test_the_sd3_file_loads_in_the_requested_dtype(sd3_folder, sd3_file):
    engine = MasaCtrlEngine.from_single_file(
        sd3_file, config=str(sd3_folder), dtype=torch.bfloat16, device="cpu"
    )
    pipeline = engine.pipeline
    assert pipeline.transformer.dtype == pipeline.vae.dtype == torch.bfloat16
    assert pipeline.text_encoder_3.dtype == torch.bfloat16


def test_the_flux_file_is_diffusers_own_layout(tiny_flux_checkpoint, flux_file):
    """Every weight of the tiny FLUX transformer is in the file, under the name diffusers'
    conversion reads; its conversion itself refuses the narrow single-stream blocks."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(
        str(tiny_flux_checkpoint), subfolder="transformer"
    )
    file = load_file(flux_file)
    assert sum(t.numel() for t in file.values()) == sum(
        t.numel() for t in transformer.state_dict().values()
    )
    attention = transformer.transformer_blocks[0].attn
    fused = torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight])
    assert torch.equal(file["double_blocks.0.img_attn.qkv.weight"], fused)
    refused = "cannot load checkpoint tiny-flux.safetensors: .*3072"
    with pytest.raises(ModelLoadError, match=refused):
        MasaCtrlEngine.from_single_file(flux_file, config=str(tiny_flux_checkpoint), device="cpu")


def test_a_mismatched_flux_or_sd3_file_is_refused(flux_file, sd3_file, tiny_checkpoint, sd3_folder):
    with pytest.raises(ModelLoadError, match=r"^tiny-flux.safetensors is a flux checkpoint, but"):
        MasaCtrlEngine.from_single_file(flux_file, family="sd", device="cpu")
    flux = "tiny-flux.safetensors"
    with pytest.raises(ModelLoadError, match=f"is for sd models, but {flux} is flux$"):
        MasaCtrlEngine.from_single_file(flux_file, config=str(tiny_checkpoint), device="cpu")
    with pytest.raises(ModelLoadError, match=f"is for sd3 models, but {flux} is flux$"):
        MasaCtrlEngine.from_single_file(flux_file, config=str(sd3_folder), device="cpu")
    with pytest.raises(ModelLoadError, match="^tiny-sd3.safetensors is an sd3 checkpoint, but"):
        MasaCtrlEngine.from_single_file(sd3_file, family="flux", device="cpu")
    with pytest.raises(ModelLoadError, match="a prediction type applies only to SD and SDXL"):
        MasaCtrlEngine.from_single_file(sd3_file, prediction_type="epsilon", device="cpu")


def test_a_pickled_flux_file_is_refused_unless_allowed(flux_file, tmp_path):
    ckpt = tmp_path / "flux.ckpt"
    torch.save(load_file(flux_file), ckpt)
    with pytest.raises(ModelLoadError, match="flux.ckpt is a pickle checkpoint"):
        MasaCtrlEngine.from_single_file(ckpt, device="cpu")
    assert inspect_checkpoint(ckpt, allow_pickle=True).family == "flux"


@pytest.mark.parametrize(
    ("keys", "family", "generation"),
    [
        (["double_blocks.0.img_attn.norm.key_norm.scale"], "flux", "flux-schnell"),
        (
            [
                "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
                "model.diffusion_model.guidance_in.in_layer.bias",
            ],
            "flux",
            "flux-dev",
        ),
        (["joint_blocks.0.context_block.adaLN_modulation.1.bias"], "sd3", "sd3"),
        (
            [
                "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
                "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
                "first_stage_model.quant_conv.weight",
            ],
            "sd3",
            "sd35_medium",
        ),
        (
            [
                "joint_blocks.0.context_block.adaLN_modulation.1.bias",
                "joint_blocks.37.x_block.mlp.fc1.weight",
            ],
            "sd3",
            "sd35_large",
        ),
    ],
)
def test_the_transformer_family_is_read_from_the_keys(tmp_path, keys, family, generation):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    info = inspect_checkpoint(path)
    assert (info.family, info.generation, info.v_prediction_marker) == (family, generation, False)


@pytest.mark.slow
def test_the_flux_layout_round_trips_at_flux1_width(tmp_path):
    """At FLUX.1's width (24 heads of 128, T5 4096; 1 double- and 1 single-stream block, bf16,
    0.55 B random weights, ~10 s) diffusers' conversion reads the written file back exactly."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    from masactrl_core.tiny_single_file import flux_original_state_dict

    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    model.save_config(tmp_path / "transformer")
    file = tmp_path / "flux1.safetensors"
    save_file(flux_original_state_dict(model), str(file))
    loaded = FluxTransformer2DModel.from_single_file(
        str(file),
        config=str(tmp_path),
        subfolder="transformer",
        torch_dtype=torch.bfloat16,
        local_files_only=True,
    ).state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), f"{key} differs"
