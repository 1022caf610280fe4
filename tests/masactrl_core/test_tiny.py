"""The offline tiny checkpoint loads like a real model, has SD1.5's topology and is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from masactrl_core.tiny import tiny_checkpoint_info, write_tiny_checkpoint


def _weight_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))
    }


def test_loads_offline_as_stable_diffusion_pipeline(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 2
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    cfg = pipe.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (1, False, False)


def test_unet_has_sd15_topology(tiny_checkpoint: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint, subfolder="unet")
    per_part = [
        sum(isinstance(m, BasicTransformerBlock) for m in part.modules())
        for part in (unet.down_blocks, unet.mid_block, unet.up_blocks)
    ]
    assert per_part == [6, 1, 9]
    assert unet.config.layers_per_block == 2


def test_tokenizer_files_are_written_by_the_code(tiny_checkpoint: Path) -> None:
    from transformers import CLIPTokenizer

    vocab = json.loads((tiny_checkpoint / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert {"a", "a</w>", "<|startoftext|>", "<|endoftext|>"} <= vocab.keys()
    merges = (tiny_checkpoint / "tokenizer" / "merges.txt").read_text(encoding="utf-8")
    assert merges.startswith("#version:")
    tok = CLIPTokenizer.from_pretrained(tiny_checkpoint, subfolder="tokenizer")
    ids = tok("A photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == vocab["<|startoftext|>"]
    assert tok.convert_ids_to_tokens(ids[1:6]) == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
    ]


def test_same_seed_gives_identical_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    reference = _weight_files(tiny_checkpoint)
    assert set(reference) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert _weight_files(again) == reference
    differing = _weight_files(other)
    assert all(differing[name] != reference[name] for name in reference)


def test_info_states_native_size(tmp_path: Path) -> None:
    info = tiny_checkpoint_info(tmp_path, seed=3)
    assert (info.native_size, info.transformer_blocks) == (64, 16)
    assert "64x64" in info.describe()


def test_sdxl_checkpoint_has_sdxl_topology_and_loads_offline(
    tiny_sdxl_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from masactrl_core.attention import self_attention_layers

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_checkpoint)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.config.force_zeros_for_empty_prompt
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae.config.force_upcast
    assert len(self_attention_layers(pipe.unet)) == 70
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.tokenizer_2.pad_token == "!"
    # The DDIM keys of the real SDXL scheduler config survive, as the engine reads them.
    assert pipe.scheduler.config.set_alpha_to_one is False
    info = tiny_checkpoint_info(tiny_sdxl_checkpoint, family="sdxl")
    assert (info.native_size, info.transformer_blocks) == (64, 70)


def test_unknown_family_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        write_tiny_checkpoint(tmp_path / "x", family="kandinsky")
