"""The ``sd3`` family: Stable Diffusion 3 and 3.5, multimodal diffusion transformers.

Recognized by a ``StableDiffusion3...Pipeline`` class in ``model_index.json``. What differs:

* **Rows**: classifier-free guidance as on UNets, so a step evaluates the source and the N
  targets in both guidance halves: ``2(1 + N)`` rows (the source's halves shared when equal).
* **Prompts**: ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G hidden states
  (padded to T5's width) followed by T5's, and both CLIP pooled projections; a checkpoint
  loaded without T5 (``text_encoder_3=None``) gets the pipeline's zeros in its place. T5 takes
  :attr:`SD3Backbone.max_sequence_length` tokens (the tokenizer's declared length, at most the
  pipeline's 256). The empty negative prompt is encoded, as the pipeline does.
* **Blocks**: the joint blocks' attention (``transformer_blocks.i.attn``), ``0..B-1``; SD3.5's
  extra image-only attention (``attn2``) is not controlled. Every block sees the patch grid,
  ``log2(patch_size)`` halvings below the latent. No rotary positions: positions are added to
  the patch embeddings.
* **Solver**: flow-matching Euler with the scheduler's own spacing and static ``shift``
  (dynamic only if the config says so), as the pipeline sets it up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from masactrl_core.attention_mmdit import SD3MutualAttentionProcessor
from masactrl_core.backbones.base import Conditioning
from masactrl_core.backbones.mmdit import MMDiTBackbone
from masactrl_core.solvers.flow import FlowMatchSolver

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["SD3Backbone", "joint_attention_layers"]

# StableDiffusion3Pipeline's default max_sequence_length.
PIPELINE_MAX_SEQUENCE_LENGTH = 256

_LAYER = re.compile(r"^transformer_blocks\.(\d+)\.attn\.processor$")


def joint_attention_layers(transformer: Any) -> list[str]:
    """Processor names of the joint blocks' attention, in execution order."""
    names = [name for name in transformer.attn_processors if _LAYER.match(name)]
    return sorted(names, key=lambda name: int(name.split(".")[1]))


class SD3Backbone(MMDiTBackbone):
    family = "sd3"
    mutual_attention = SD3MutualAttentionProcessor

    def __init__(self, pipeline: Any) -> None:
        transformer = pipeline.transformer
        names = joint_attention_layers(transformer)
        vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        patch = int(transformer.config.patch_size)
        native = int(transformer.config.sample_size) * vae_scale_factor
        super().__init__(
            pipeline,
            denoiser=transformer,
            layer_names=names,
            block_levels=[int(math.log2(patch))] * len(names),
            latent_channels=int(transformer.config.in_channels),
            vae_scale_factor=vae_scale_factor,
            size_multiple=vae_scale_factor * patch,
            native_size=(native, native),
        )
        tokenizer_3 = getattr(pipeline, "tokenizer_3", None)
        declared = getattr(tokenizer_3, "model_max_length", PIPELINE_MAX_SEQUENCE_LENGTH)
        #: T5 tokens per prompt: the tokenizer's declared length, at most the pipeline's 256.
        self.max_sequence_length = min(int(declared), PIPELINE_MAX_SEQUENCE_LENGTH)

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> SD3Backbone:
        return cls(pipeline)

    @classmethod
    def recognizes(cls, config: dict[str, Any]) -> bool:
        return str(config.get("_class_name", "")).startswith("StableDiffusion3")

    @classmethod
    def pipeline_class(cls) -> type[DiffusionPipeline]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            StableDiffusion3Pipeline,
        )

        return StableDiffusion3Pipeline

    @classmethod
    def transformer_class(cls) -> Any:
        from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

        return SD3Transformer2DModel

    def make_solver(self) -> FlowMatchSolver:
        return FlowMatchSolver(self.pipeline.scheduler.config, pipeline_sigmas=False)

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Joint CLIP + T5 embeddings and pooled projections (equal prompts encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=unique,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        encoded = Conditioning(embeds, {"pooled_projections": pooled})
        return encoded.rows([unique.index(p) for p in prompts])

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        residuals: dict[str, object] | None = None,
    ) -> torch.Tensor:
        if residuals:
            raise self._refuse_conditions()
        output: torch.Tensor = self.denoiser(
            hidden_states=latents,
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.added["pooled_projections"],
            return_dict=False,
        )[0]
        return output
