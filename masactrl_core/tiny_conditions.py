"""Small seeded ControlNets and T2I-Adapters that fit the tiny checkpoints of :mod:`tiny`.

A ControlNet made from a UNet starts with zero output convolutions (its "zero convs"), so its
residuals are exactly zero and every test would pass whatever the engine did with them. Here
those convolutions get seeded random weights, so the residuals are non-zero from the start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONDITION_KINDS = ("controlnet", "adapter")
# Small enough that residuals steer the tiny UNet visibly without swamping it.
_ZERO_CONV_STD = 0.1


def build_tiny_condition_model(
    kind: str, unet: Any, family: str, seed: int = 0, vae_scale_factor: int = 2
) -> Any:
    """A seeded ControlNetModel or T2IAdapter whose shapes fit ``unet`` (an SD or SDXL UNet).

    ``vae_scale_factor`` is the base model's (2 for the tiny checkpoints): the condition encoders
    must bring the image down to the latent grid.
    """
    import torch
    from diffusers import ControlNetModel, T2IAdapter

    from masactrl_core.backbones import backbone_class
    from masactrl_core.backbones.unet import UNetBackbone

    if kind not in CONDITION_KINDS:
        raise ValueError(f"unknown condition kind {kind!r}; expected controlnet or adapter")
    channels = list(unet.config.block_out_channels)
    vae_factor = vae_scale_factor
    torch.manual_seed(seed)
    if kind == "adapter":
        # The family's adapter layout (SDXL's starts at half the latent grid, one level more).
        backbone = backbone_class(family)
        assert issubclass(backbone, UNetBackbone)  # the tiny checkpoints are UNet families
        extra = backbone.adapter_extra_halvings
        return T2IAdapter(  # type: ignore[no-untyped-call]
            in_channels=3,
            channels=[*channels, *channels[-1:] * extra],
            num_res_blocks=1,
            downscale_factor=vae_factor * 2**extra,
            adapter_type=backbone.adapter_type,
        )
    # One stage per halving of the image, from 4 channels doubling.
    halvings = vae_factor.bit_length() - 1
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(4 * 2**i for i in range(halvings + 1)),
        load_weights_from_unet=True,
    )
    zero_convs = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for conv in zero_convs:
            weight = torch.randn(conv.weight.shape, generator=generator) * _ZERO_CONV_STD
            conv.weight.copy_(weight)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * _ZERO_CONV_STD)
    return controlnet


def write_tiny_condition_model(
    out_dir: str | Path, *, kind: str, base: str | Path, seed: int = 0
) -> Path:
    """Write a seeded condition model fitting the tiny checkpoint at ``base``; return its path."""
    from diffusers import UNet2DConditionModel

    from masactrl_core.backbones import detect_family

    base = Path(base)
    index = base / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{base} is not a diffusers checkpoint (no model_index.json)")
    family = detect_family(json.loads(index.read_text(encoding="utf-8")))
    unet = UNet2DConditionModel.from_pretrained(base / "unet")  # type: ignore[no-untyped-call]
    vae = json.loads((base / "vae" / "config.json").read_text(encoding="utf-8"))
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    model = build_tiny_condition_model(kind, unet, family, seed, vae_scale_factor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def describe_tiny_condition_model(path: Path, kind: str, base: Path, seed: int) -> str:
    """One line for humans (the CLI prints it)."""
    label = "ControlNet" if kind == "controlnet" else "T2I-Adapter"
    return f"tiny {label} (seed {seed}) for {base} at {path}"


__all__ = [
    "CONDITION_KINDS",
    "build_tiny_condition_model",
    "describe_tiny_condition_model",
    "write_tiny_condition_model",
]
