"""The ``flux`` family: FLUX.1 [dev] and [schnell], multimodal diffusion transformers.

Recognized by a ``Flux...Pipeline`` class in ``model_index.json``. What differs from the UNets:

* **Rows.** FLUX.1 [dev] is guidance-distilled: the guidance scale is an input of the
  transformer (``guidance``), there are no unconditional rows, so a step evaluates the source and
  the N targets: ``1 + N`` rows (:attr:`classifier_free_guidance` is False). [schnell] has no
  guidance input at all. A negative prompt has nothing to act on and is refused.
* **Prompts**: ``FluxPipeline.encode_prompt``: CLIP's pooled embedding (``pooled_projections``)
  and T5's hidden states, padded to :attr:`FluxBackbone.max_sequence_length` tokens (the T5
  tokenizer's declared length, at most the pipeline's 512).
* **Latents** stay (16, h, w) in the sampler, so masks, anchoring and previews read them as on
  UNets; :meth:`predict` packs them into 2x2 patches (the transformer's image tokens), with
  FLUX's latent image ids for the rotary positions, and unpacks the velocity. Packing is a
  permutation, so the Euler step on unpacked latents is the pipeline's step, value for value.
* **Blocks**: the attention of the double-stream blocks ``0..D-1``, then of the single-stream
  blocks ``D..D+S-1``, each controlled by
  :class:`~masactrl_core.attention_mmdit.FluxMutualAttentionProcessor`. Every block sees the
  packed grid: one halving below the latent (level 1).
* **Solver**: flow-matching Euler with the pipeline's ``linspace`` sigmas and dynamic shift
  (:class:`~masactrl_core.solvers.flow.FlowMatchSolver`).
* **VAE**: shift and scale as in the pipeline
  (:class:`~masactrl_core.backbones.mmdit.MMDiTBackbone`).
* **Not yet**: layout conditions and sequences (no ControlNet path here yet) and automatic masks
  (no cross-attention: the joint attention's image-to-text weights would be the source of word
  maps); both are refused with one sentence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from masactrl_core.attention_mmdit import FluxMutualAttentionProcessor
from masactrl_core.backbones.base import Conditioning
from masactrl_core.backbones.mmdit import MMDiTBackbone
from masactrl_core.errors import InvalidInput
from masactrl_core.runs import PAPER_START_STEP, ControlConfig
from masactrl_core.solvers.flow import FlowMatchSolver

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["FluxBackbone", "flux_attention_layers", "pack", "unpack"]

# The pipeline's default for max_sequence_length (FLUX.1 [dev] was trained with 512 T5 tokens).
PIPELINE_MAX_SEQUENCE_LENGTH = 512

_LAYER = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor$")


def flux_attention_layers(transformer: Any) -> tuple[list[str], int]:
    """Processor names of every block's attention in execution order, and the double count."""
    names = [name for name in transformer.attn_processors if _LAYER.match(name)]

    def order(name: str) -> tuple[int, int]:
        match = _LAYER.match(name)
        assert match is not None
        return (0 if match.group(1) == "transformer_blocks" else 1, int(match.group(2)))

    names.sort(key=order)
    double = sum(1 for name in names if name.startswith("transformer_blocks."))
    return names, double


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 · w/2, 4C): FLUX's 2x2 patch tokens, row-major."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of (``height``, ``width``) cells."""
    b, _, packed = tokens.shape
    c = packed // 4
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Any:
    """FLUX's (h/2 · w/2, 3) position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(MMDiTBackbone):
    family = "flux"
    classifier_free_guidance = False
    mutual_attention = FluxMutualAttentionProcessor

    def __init__(self, pipeline: Any) -> None:
        transformer = pipeline.transformer
        names, double = flux_attention_layers(transformer)
        vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        native = int(pipeline.default_sample_size) * vae_scale_factor
        super().__init__(
            pipeline,
            denoiser=transformer,
            layer_names=names,
            # The 2x2 packing halves the latent grid once before every block.
            block_levels=[1] * len(names),
            latent_channels=int(transformer.config.in_channels) // 4,
            vae_scale_factor=vae_scale_factor,
            size_multiple=vae_scale_factor * 2,
            native_size=(native, native),
        )
        #: Double-stream blocks come first: blocks ``0..double_blocks-1``.
        self.double_blocks = double
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        declared = getattr(pipeline.tokenizer_2, "model_max_length", PIPELINE_MAX_SEQUENCE_LENGTH)
        #: T5 tokens per prompt: the tokenizer's declared length, at most the pipeline's 512.
        self.max_sequence_length = min(int(declared), PIPELINE_MAX_SEQUENCE_LENGTH)

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> FluxBackbone:
        return cls(pipeline)

    @classmethod
    def recognizes(cls, config: dict[str, Any]) -> bool:
        return str(config.get("_class_name", "")).startswith("Flux")

    @classmethod
    def pipeline_class(cls) -> type[DiffusionPipeline]:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        return FluxPipeline

    @classmethod
    def transformer_class(cls) -> Any:
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

        return FluxTransformer2DModel

    def make_solver(self) -> FlowMatchSolver:
        return FlowMatchSolver(self.pipeline.scheduler.config, pipeline_sigmas=True)

    def default_control(self) -> ControlConfig:
        """From the first single-stream block, after the paper's start step ([schnell]: step 1).

        The double-stream blocks, where text and image still have separate weights, fix the
        layout and what is where; the single-stream blocks render appearance (docs/engine.md).
        [schnell] samples in about 4 steps, where step 4 would leave nothing to control.
        """
        start_step = PAPER_START_STEP if self.guidance_embeds else 1
        start_layer = min(self.double_blocks, self.block_count - 1)
        return ControlConfig(start_step=start_step, start_layer=start_layer)

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer_2

    # -- prompts ---------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """T5 hidden states and CLIP's pooled embedding per prompt (equal prompts encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=unique,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        encoded = Conditioning(embeds, {"pooled_projections": pooled})
        return encoded.rows([unique.index(p) for p in prompts])

    def conditioning(
        self, prompts: Sequence[str], negative_prompt: str, size: tuple[int, int]
    ) -> tuple[Conditioning, Conditioning]:
        if negative_prompt:
            raise InvalidInput(
                "negative_prompt must be empty for FLUX models, which take guidance as an input "
                "and have no unconditional branch"
            )
        encoded = self.encode_prompts(prompts, size)
        # No unconditional rows are ever run (classifier_free_guidance is False).
        return encoded, encoded.rows([0])

    def with_guidance(self, cond: Conditioning, guidance_scale: float) -> Conditioning:
        if not self.guidance_embeds:
            return cond
        rows = cond.embeds.shape[0]
        # FluxPipeline's guidance: float32, one value per row.
        guidance = torch.full([rows], guidance_scale, device=self.device, dtype=torch.float32)
        return Conditioning(cond.embeds, {**cond.added, "guidance": guidance})

    # -- the denoiser ----------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        residuals: dict[str, object] | None = None,
    ) -> torch.Tensor:
        if residuals:
            raise self._refuse_conditions()
        rows, _, height, width = latents.shape
        embeds = cond.embeds
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        image_ids = latent_image_ids(height, width, self.device, embeds.dtype)
        # As FluxPipeline: the timestep in the latents' dtype, then divided by 1000.
        t = timestep.expand(rows).to(latents.dtype)
        output: torch.Tensor = self.denoiser(
            hidden_states=pack(latents),
            timestep=t / 1000,
            guidance=cond.added.get("guidance"),
            pooled_projections=cond.added["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return unpack(output, height, width)
