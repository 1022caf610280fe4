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

FLUX.1 and SD3 transformers (:func:`write_transformer_single_file`) are written alone, as
community files circulate: FLUX.1 in Black Forest Labs' layout without a prefix, SD3 in Stability
AI's under ``model.diffusion_model.`` (:func:`flux_original_state_dict`,
:func:`sd3_original_state_dict`, the inverses of diffusers' conversions).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from masactrl_core.backbones.flux import FluxBackbone
from masactrl_core.backbones.sd3 import SD3Backbone

__all__ = [
    "flux_original_state_dict",
    "original_state_dict",
    "sd3_original_state_dict",
    "write_config_folder",
    "write_single_file",
    "write_transformer_single_file",
]

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


# -- the multimodal diffusion transformers: FLUX.1 (Black Forest Labs' layout) and SD3 -----------

# diffusers module -> original module, for the weights that only change their name.
_FLUX_RENAMES = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_FLUX_SINGLE_RENAMES = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
_SD3_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_SD3_JOINT_RENAMES = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift) where the original is (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fuse(
    weights: dict[str, torch.Tensor], out: dict[str, torch.Tensor], parts: list[str], fused: str
) -> None:
    """Concatenate the weights and biases named by ``parts`` (module names) into ``fused``."""
    for leaf in ("weight", "bias"):
        names = [f"{part}.{leaf}" for part in parts]
        if all(name in weights for name in names):
            out[f"{fused}.{leaf}"] = torch.cat([weights.pop(name) for name in names], dim=0)


def _rename(
    weights: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    renames: dict[str, str],
    pre: str = "",
) -> None:
    """Move the weights of the modules under ``pre`` that ``renames`` names to their new name."""
    for key in [key for key in weights if key.startswith(pre)]:
        module, _, leaf = key[len(pre) :].rpartition(".")
        if module in renames:
            out[f"{renames[module]}.{leaf}"] = weights.pop(key)


def _under(block: str, renames: dict[str, str]) -> dict[str, str]:
    return {module: f"{block}{name}" for module, name in renames.items()}


def flux_original_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel``'s weights in Black Forest Labs' single-file layout.

    The inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: the attention
    projections are fused (``img_attn.qkv``, ``txt_attn.qkv``; a single-stream block's ``linear1``
    is q, k, v and the MLP input), the output norm's halves are swapped, the rest renamed.
    """
    weights = {key: tensor.detach().cpu() for key, tensor in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(int(transformer.config.num_layers)):
        pre, block = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _fuse(weights, out, [f"{pre}attn.to_{p}" for p in "qkv"], f"{block}img_attn.qkv")
        _fuse(weights, out, [f"{pre}attn.add_{p}_proj" for p in "qkv"], f"{block}txt_attn.qkv")
        _rename(weights, out, _under(block, _FLUX_DOUBLE_RENAMES), pre)
    for i in range(int(transformer.config.num_single_layers)):
        pre, block = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        parts = [*(f"{pre}attn.to_{p}" for p in "qkv"), f"{pre}proj_mlp"]
        _fuse(weights, out, parts, f"{block}linear1")
        _rename(weights, out, _under(block, _FLUX_SINGLE_RENAMES), pre)
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(
            weights.pop(f"norm_out.linear.{leaf}")
        )
    _rename(weights, out, _FLUX_RENAMES)
    for key in list(out):  # the norms' weights are called ``scale`` there
        if key.endswith("_norm.weight"):
            out[key.removesuffix("weight") + "scale"] = out.pop(key)
    if weights:
        raise ValueError(f"no original name for FLUX weights {sorted(weights)}")
    return {key: tensor.contiguous() for key, tensor in out.items()}


def sd3_original_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel``'s weights in Stability AI's single-file layout (no prefix).

    The inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` for models
    without dual attention (SD3 medium's shape): fused ``qkv`` projections per stream, the last
    joint block's context modulation and the output norm with their halves swapped.
    """
    if getattr(transformer.config, "dual_attention_layers", ()):
        raise ValueError("SD3.5 dual attention layers are not supported here")
    weights = {key: tensor.detach().cpu() for key, tensor in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {"pos_embed": weights.pop("pos_embed.pos_embed")}
    last = int(transformer.config.num_layers) - 1
    for i in range(last + 1):
        pre, block = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        _fuse(weights, out, [f"{pre}attn.to_{p}" for p in "qkv"], f"{block}x_block.attn.qkv")
        parts = [f"{pre}attn.add_{p}_proj" for p in "qkv"]
        _fuse(weights, out, parts, f"{block}context_block.attn.qkv")
        if i == last:  # a context-pre-only block: its modulation is an AdaLayerNormContinuous
            for leaf in ("weight", "bias"):
                name = f"{pre}norm1_context.linear.{leaf}"
                out[f"{block}context_block.adaLN_modulation.1.{leaf}"] = _swap_halves(
                    weights.pop(name)
                )
        _rename(weights, out, _under(block, _SD3_JOINT_RENAMES), pre)
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(
            weights.pop(f"norm_out.linear.{leaf}")
        )
    _rename(weights, out, _SD3_RENAMES)
    if weights:
        raise ValueError(f"no original name for SD3 weights {sorted(weights)}")
    return {key: tensor.contiguous() for key, tensor in out.items()}


# Community SD3 files put the transformer under the original UNet's prefix; FLUX files use none.
_TRANSFORMER_WRITERS: dict[str, tuple[Callable[[Any], dict[str, torch.Tensor]], str, Any]] = {
    "flux": (flux_original_state_dict, "", FluxBackbone),
    "sd3": (sd3_original_state_dict, "model.diffusion_model.", SD3Backbone),
}


def write_transformer_single_file(
    checkpoint: str | Path, out_file: str | Path, *, family: str
) -> Path:
    """Write the transformer of the diffusers folder ``checkpoint`` (``flux`` or ``sd3``) as one
    original-layout file: the transformer alone, as community FLUX.1 files circulate."""
    from safetensors.torch import save_file

    if family not in _TRANSFORMER_WRITERS:
        raise ValueError(f"unknown MM-DiT family {family!r}; expected flux or sd3")
    convert, prefix, backbone = _TRANSFORMER_WRITERS[family]
    transformer = backbone.transformer_class().from_pretrained(
        str(checkpoint), subfolder="transformer"
    )
    tensors = {prefix + key: tensor for key, tensor in convert(transformer).items()}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out
