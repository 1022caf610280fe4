"""The ``sdxl`` family: two text encoders, a pooled embedding and added time ids.

Recognized by a second text encoder (``text_encoder_2``) or an ``...XL...`` pipeline class in
``model_index.json``; an SDXL refiner (no first text encoder) is refused. What differs from
``sd``:

* **Prompts**: ``StableDiffusionXLPipeline.encode_prompt`` gives both encoders' penultimate
  hidden states (concatenated) and the pooled projection of the second; the time ids (original
  size, crop top-left (0, 0), target size, each (height, width) of the run) are added here. Both
  go to the UNet through ``added_cond_kwargs``, in sampling and in inversion.
* **The empty negative prompt** is zeros (embeddings and pooled embeddings) when the checkpoint
  sets ``force_zeros_for_empty_prompt``, as the SDXL pipeline does. Only the negative prompt: an
  empty *source* prompt is encoded, so the two are never mistaken for each other.
* **The VAE** stays in float32 under a float16 model when its config says ``force_upcast`` (the
  SDXL VAE overflows in float16).
* **T2I-Adapters** for SDXL produce their first features at half the latent grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from masactrl_core.backbones.base import Conditioning
from masactrl_core.backbones.unet import UNetBackbone
from masactrl_core.errors import ModelLoadError

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["SDXLBackbone"]


class SDXLBackbone(UNetBackbone):
    family = "sdxl"
    adapter_type = "full_adapter_xl"
    adapter_extra_halvings = 1
    controlnet_addition_embed_type = "text_time"

    def __init__(self, pipeline: Any) -> None:
        super().__init__(pipeline)
        self.force_zeros_for_empty_prompt = bool(
            getattr(pipeline.config, "force_zeros_for_empty_prompt", False)
        )
        # The fp16 SDXL VAE overflows; diffusers' SDXL pipeline upcasts it when its config says so.
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)

    @classmethod
    def recognizes(cls, config: dict[str, Any]) -> bool:
        return "text_encoder_2" in config or "XL" in config.get("_class_name", "")

    @classmethod
    def check_config(cls, config: dict[str, Any], model: str) -> None:
        if not (config.get("text_encoder") or [None])[0]:
            raise ModelLoadError(
                f"{model} has no first text encoder (an SDXL refiner?); MasaCtrl needs a "
                "base checkpoint"
            )

    @classmethod
    def pipeline_class(cls) -> type[DiffusionPipeline]:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
            StableDiffusionXLPipeline,
        )

        return StableDiffusionXLPipeline

    @classmethod
    def load_arguments(cls) -> dict[str, object]:
        return {"add_watermarker": False}

    def _time_ids(self, width: int, height: int, count: int) -> torch.Tensor:
        """SDXL's added time ids: original size, crop top-left, target size, each (h, w)."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype)
        return ids.to(self.device).expand(count, -1)

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Conditioning per prompt; equal prompts get bitwise-equal rows (encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            unique, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )  # fmt: skip
        added = {
            "text_embeds": pooled.to(self.dtype),
            "time_ids": self._time_ids(*size, len(unique)),
        }
        encoded = Conditioning(embeds.to(self.dtype), added)
        return encoded.rows([unique.index(p) for p in prompts])

    def conditioning(
        self, prompts: Sequence[str], negative_prompt: str, size: tuple[int, int]
    ) -> tuple[Conditioning, Conditioning]:
        if self.force_zeros_for_empty_prompt and negative_prompt == "":
            # What StableDiffusionXLPipeline does without a negative prompt: zero embeddings.
            encoded = self.encode_prompts(prompts, size)
            first = encoded.rows([0])
            added = {**first.added, "text_embeds": torch.zeros_like(first.added["text_embeds"])}
            return encoded, Conditioning(torch.zeros_like(first.embeds), added)
        return super().conditioning(prompts, negative_prompt, size)
