"""The ``sd`` family: SD1.x/2.x-shaped checkpoints (one CLIP text encoder, a UNet, DDIM).

The fallback of family detection: a checkpoint no other backbone recognizes is loaded as this.
Prompt conditioning is the text encoder's last hidden states, nothing added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from masactrl_core.backbones.base import Conditioning
from masactrl_core.backbones.unet import UNetBackbone

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["SDBackbone"]


class SDBackbone(UNetBackbone):
    family = "sd"

    @classmethod
    def recognizes(cls, config: dict[str, Any]) -> bool:
        return True  # any SD-shaped diffusers checkpoint; more specific families are tried first

    @classmethod
    def recognizes_condition(cls, kind: str, config: Mapping[str, Any]) -> bool:
        return True  # as for checkpoints: the fallback when no other family claims it

    @classmethod
    def pipeline_class(cls) -> type[DiffusionPipeline]:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            StableDiffusionPipeline,
        )

        return StableDiffusionPipeline

    @classmethod
    def load_arguments(cls) -> dict[str, object]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Conditioning per prompt; equal prompts get bitwise-equal rows (encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds, _ = self.pipeline.encode_prompt(
            unique, self.device, 1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds).rows([unique.index(p) for p in prompts])
