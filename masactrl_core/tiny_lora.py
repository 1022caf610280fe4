"""Tiny seeded LoRA adapters for a tiny checkpoint, made with peft, saved the way diffusers saves.

An adapter targets the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of the
denoiser (an SD UNet, or a FLUX transformer: both its double- and single-stream blocks) and,
optionally, those of the text encoder (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``). peft initialises ``B`` to zero (a new adapter changes nothing); here both ``A`` and
``B`` are drawn from a seeded normal, so the adapter visibly changes the model's output. The file
is ``pytorch_lora_weights.safetensors`` in diffusers' key layout, with each component's peft
config (rank, alpha) in the metadata, as diffusers' training scripts write it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TinyLoraInfo", "write_tiny_lora"]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class TinyLoraInfo:
    """Where an adapter was written and how it scales: ``alpha / rank`` times its weight."""

    path: Path
    rank: int
    alpha: float
    text_encoder: bool

    @property
    def file(self) -> Path:
        return self.path / WEIGHT_NAME

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _randomise(model: Any, generator: torch.Generator, std: float) -> None:
    for name, parameter in sorted(model.named_parameters()):
        if ".lora_A." in name or ".lora_B." in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def write_tiny_lora(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: int = 2,
    text_encoder: bool = True,
    std: float = 0.2,
) -> TinyLoraInfo:
    """Write a seeded random LoRA for a tiny diffusers folder ``checkpoint`` (tested: sd, flux).

    The family comes from the checkpoint's ``model_index.json``, as the engine reads it.
    """
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from masactrl_core.backbones import backbone_class, detect_family

    config: dict[str, Any] = DiffusionPipeline.load_config(str(checkpoint))  # type: ignore[assignment]
    backbone = backbone_class(detect_family(config))
    pipeline_class: Any = backbone.pipeline_class()
    pipeline = pipeline_class.from_pretrained(str(checkpoint), **backbone.load_arguments())
    # The component the family's backbone denoises with ("unet", "transformer"), by identity.
    denoiser = backbone.from_pipeline(pipeline).denoiser
    denoiser_name = next(name for name, part in pipeline.components.items() if part is denoiser)
    generator = torch.Generator("cpu").manual_seed(seed)
    denoiser_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(UNET_TARGETS))
    inject_adapter_in_model(denoiser_config, denoiser)
    _randomise(denoiser, generator, std)
    layers: dict[str, Any] = {
        f"{denoiser_name}_lora_layers": get_peft_model_state_dict(denoiser),
        f"{denoiser_name}_lora_adapter_metadata": denoiser_config.to_dict(),  # type: ignore[no-untyped-call]
    }
    if text_encoder:
        text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TEXT_TARGETS))
        inject_adapter_in_model(text_config, pipeline.text_encoder)
        _randomise(pipeline.text_encoder, generator, std)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipeline.text_encoder)
        layers["text_encoder_lora_adapter_metadata"] = text_config.to_dict()  # type: ignore[no-untyped-call]
    out = Path(out_dir)
    pipeline_class.save_lora_weights(out, weight_name=WEIGHT_NAME, **layers)
    return TinyLoraInfo(out, rank, float(alpha), text_encoder)
