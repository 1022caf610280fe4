"""Test material in community formats: a diffusers folder as one original-layout checkpoint file.

:func:`original_state_dict` renames an SD-family pipeline's weights to the key layout of the
original Stable Diffusion code (CompVis ``ldm``), the layout single-file community checkpoints
use; :func:`write_single_file` saves it as one ``.safetensors`` file, and
:func:`write_config_folder` copies a diffusers folder without its weights (the configs and
tokenizer a single-file load takes its configuration from). Loading the file back through
diffusers' single-file conversion must give the folder's weights exactly, which the tests check.

The layout, per component (``L`` = the UNet's ``layers_per_block``, ``n`` = the VAE's blocks):

- UNet under ``model.diffusion_model.``: ``conv_in`` is ``input_blocks.0.0``; down block ``i``
  layer ``j`` is ``input_blocks.{1 + i(L+1) + j}`` (``.0`` the resnet, ``.1`` the transformer),
  its downsampler ``input_blocks.{(i+1)(L+1)}.0.op``; the mid block is ``middle_block.0/1/2``;
  up block ``i`` layer ``j`` is ``output_blocks.{i(L+1) + j}``, its upsampler the next free
  index of the last layer. Resnets rename their parts (``norm1`` is ``in_layers.0`` ...);
  transformers keep theirs. Time embeddings are ``time_embed``, SDXL's added ones ``label_emb``.
- VAE under ``first_stage_model.``: ``down.{i}.block.{j}``; the decoder's up blocks are numbered
  from the bottom (``up.{n-1-i}``); the mid attention's linear layers are 1x1 convolutions.
- SD1.x text encoder under ``cond_stage_model.transformer.``, with transformers' own keys.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["original_state_dict", "write_config_folder", "write_single_file"]

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _resnet(rest: str) -> str:
    part, _, leaf = rest.rpartition(".")
    return f"{_RESNET_PARTS.get(part, part)}.{leaf}"


def _unet_key(key: str, config: Any) -> str:
    """The original name of one diffusers UNet weight."""
    stride = config.layers_per_block + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * stride + int(m[2])}.0.{_resnet(m[3])}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * stride + int(m[2])}.1.{m[3]}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}",
        ),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m[1]) * stride + int(m[2])}.0.{_resnet(m[3])}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m[1]) * stride + int(m[2])}.1.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: (
                f"output_blocks.{int(m[1]) * stride + stride - 1}."
                f"{2 if 'CrossAttn' in config.up_block_types[int(m[1])] else 1}.conv.{m[2]}"
            ),
        ),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    raise ValueError(f"no original name for UNet weight {key}")


def _vae_key(key: str, blocks: int) -> str:
    """The original name of one diffusers VAE weight."""
    match = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if match is None:  # quant_conv, post_quant_conv
        return key
    side, rest = match[1], match[2]
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"down.{m[1]}.block.{m[2]}.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", lambda m: f"down.{m[1]}.downsample.{m[2]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
            lambda m: f"up.{blocks - 1 - int(m[1])}.upsample.{m[2]}",
        ),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda m: f"mid.block_{int(m[1]) + 1}.{m[2]}"),
        (
            r"mid_block\.attentions\.0\.(.+)\.(weight|bias)",
            lambda m: f"mid.attn_1.{_VAE_ATTENTION_PARTS[m[1]]}.{m[2]}",
        ),
        (r"conv_norm_out\.(.+)", lambda m: f"norm_out.{m[1]}"),
    ]
    for pattern, rename in rules:
        found = re.fullmatch(pattern, rest)
        if found:
            rest = rename(found)
            break
    return f"{side}.{rest.replace('conv_shortcut', 'nin_shortcut')}"


def original_state_dict(pipeline: Any) -> dict[str, torch.Tensor]:
    """An SD1.x-shaped pipeline's weights under the original single-file key names."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError("only SD 1.x-shaped pipelines (one CLIP text encoder) are supported")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in pipeline.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(key, pipeline.unet.config)] = tensor
    blocks = len(pipeline.vae.config.block_out_channels)
    for key, tensor in pipeline.vae.state_dict().items():
        name = _vae_key(key, blocks)
        if ".mid.attn_1." in name and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original attention uses 1x1 convolutions
        out["first_stage_model." + name] = tensor
    for key, tensor in pipeline.text_encoder.state_dict().items():
        # The original layout nests transformers' CLIPTextModel weights under ``text_model.``,
        # which recent transformers versions leave out of the state dict.
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out["cond_stage_model.transformer." + name] = tensor
    return {key: tensor.detach().cpu().contiguous() for key, tensor in out.items()}


def write_single_file(
    checkpoint: str | Path, out_file: str | Path, *, v_prediction_marker: bool = False
) -> Path:
    """Write the diffusers folder ``checkpoint`` (SD 1.x-shaped) as one original-layout file.

    ``v_prediction_marker`` adds the empty ``v_pred`` key some v-prediction checkpoints carry.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from safetensors.torch import save_file

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(checkpoint), safety_checker=None, requires_safety_checker=False
    )
    tensors = original_state_dict(pipeline)
    if v_prediction_marker:
        tensors["v_pred"] = torch.zeros(0)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def write_config_folder(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Copy a diffusers folder without its weight files: what a single-file load configures from."""
    weights = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack"}
    shutil.copytree(
        checkpoint,
        out_dir,
        ignore=lambda _folder, names: [n for n in names if Path(n).suffix in weights],
        dirs_exist_ok=True,
    )
    return Path(out_dir)
