"""What SD-family UNet backbones share: block numbering, levels, VAE latents, condition models.

Both families today (``sd``, ``sdxl``) denoise with diffusers' ``UNet2DConditionModel`` and an
``AutoencoderKL``, so most of a backbone is here and each family module adds its prompts and
loading. Nothing is read from a table: the blocks, their levels, the size multiple and the native
size come from the loaded UNet and VAE, so a pruned or distilled checkpoint of any depth works.

**Blocks** are the transformer blocks' self-attention (``attn1``) processors, numbered in
execution order: down blocks, the mid block, then up blocks. ``unet.attn_processors`` lists
down, *up*, mid, so the names are sorted by section and then by every numeric index along the
path (``transformer_blocks.10`` after ``.2``). A block's **level** (how often the latent has been
halved before it) follows from the UNet's own down- and upsamplers.

**Layout conditions** (ControlNet, T2I-Adapter) fit a UNet when their family and shapes match;
their residuals go in as the UNet's ``down_block_additional_residuals`` /
``mid_block_additional_residual`` or ``down_intrablock_additional_residuals``
(:class:`masactrl_core.conditions.ConditionRun`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image, ImageOps

from masactrl_core.backbones.base import Backbone, Conditioning, ConditionResiduals
from masactrl_core.conditions import ConditionModel, ConditionRun, PreparedCondition
from masactrl_core.errors import InvalidInput
from masactrl_core.solvers.ddim import DDIMSolver

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

__all__ = [
    "UNetBackbone",
    "block_levels",
    "cross_attention_name",
    "self_attention_layers",
]

_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_SELF_ATTENTION = re.compile(r"^(down_blocks|mid_block|up_blocks)\.(.*)\.attn1\.processor$")


def self_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of the transformer blocks' self-attention, in execution order."""
    names = [name for name in unet.attn_processors if _SELF_ATTENTION.match(name)]

    def execution_key(name: str) -> tuple[int, ...]:
        match = _SELF_ATTENTION.match(name)
        assert match is not None  # only matching names were kept above
        section, path = match.groups()
        return (_SECTION_ORDER[section], *(int(part) for part in path.split(".") if part.isdigit()))

    return sorted(names, key=execution_key)


def block_levels(unet: UNet2DConditionModel, layer_names: list[str]) -> list[int]:
    """How many times the latent has been halved at each block (0 = latent resolution).

    Counted from the UNet's own down- and upsamplers, so any SD-shaped topology works.
    """
    down = [bool(getattr(block, "downsamplers", None)) for block in unet.down_blocks]
    up = [bool(getattr(block, "upsamplers", None)) for block in unet.up_blocks]
    bottom = sum(down)
    levels: list[int] = []
    for name in layer_names:
        section, index = name.split(".")[:2]
        if section == "down_blocks":
            levels.append(sum(down[: int(index)]))
        elif section == "mid_block":
            levels.append(bottom)
        else:
            levels.append(bottom - sum(up[: int(index)]))
    return levels


def cross_attention_name(self_attention_name: str) -> str:
    """The processor name of the cross-attention (attn2) in the same transformer block."""
    return self_attention_name.removesuffix("attn1.processor") + "attn2.processor"


class _UNetConditionResiduals:
    """A :class:`ConditionRun` speaking the backbone's :class:`ConditionResiduals` protocol."""

    def __init__(self, run: ConditionRun) -> None:
        self.run = run

    @property
    def evaluations(self) -> int:
        return self.run.evaluations

    def arguments(
        self,
        step: int,
        row_images: Sequence[int],
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
    ) -> dict[str, object]:
        return self.run.unet_kwargs(step, row_images, sample, timestep, cond.embeds, cond.added)


class UNetBackbone(Backbone):
    """A ``UNet2DConditionModel`` with an ``AutoencoderKL`` and DDIM (ε or v)."""

    #: The T2I-Adapter layout made for this family, and how many halvings below the latent grid
    #: its first features sit.
    adapter_type: ClassVar[str] = "full_adapter"
    adapter_extra_halvings: ClassVar[int] = 0

    #: The added embedding of this family's UNet, which its ControlNets copy.
    controlnet_addition_embed_type: ClassVar[str | None] = None

    @classmethod
    def recognizes_condition(cls, kind: str, config: Mapping[str, Any]) -> bool:
        """A ControlNet by its added embedding, a T2I-Adapter by its layout."""
        if kind == "adapter":
            return config.get("adapter_type") == cls.adapter_type
        return config.get("addition_embed_type") == cls.controlnet_addition_embed_type

    def __init__(self, pipeline: Any) -> None:
        unet = pipeline.unet
        names = self_attention_layers(unet)
        vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        # The VAE factor times 2 per UNet downsampler: the latent must halve evenly.
        downsamplers = sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
        sample_size = unet.config.sample_size
        native = int(sample_size if isinstance(sample_size, int) else sample_size[0])
        super().__init__(
            pipeline,
            denoiser=unet,
            layer_names=names,
            block_levels=block_levels(unet, names),
            # diffusers types config as a dict; its FrozenDict also exposes keys as attributes.
            latent_channels=int(unet.config.in_channels),
            vae_scale_factor=vae_scale_factor,
            size_multiple=vae_scale_factor * 2**downsamplers,
            native_size=(native * vae_scale_factor, native * vae_scale_factor),
        )
        # Installing processors keeps their names: listing them once (a walk of the UNet) serves.
        self._processor_names = frozenset(unet.attn_processors)

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> UNetBackbone:
        return cls(pipeline)

    def make_solver(self) -> DDIMSolver:
        return DDIMSolver(self.pipeline.scheduler.config)

    def map_layer(self, block: int) -> str | None:
        name = cross_attention_name(self.layer_names[block])
        return name if name in self._processor_names else None

    # -- the denoiser ----------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        residuals: dict[str, object] | None = None,
    ) -> torch.Tensor:
        output: torch.Tensor = self.denoiser(
            latents,
            timestep,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=cond.added or None,
            return_dict=False,
            **(residuals or {}),
        )[0]
        return output

    def check_condition(self, condition: ConditionModel) -> None:
        label = "ControlNet" if condition.kind == "controlnet" else "T2I-Adapter"
        if condition.family != self.family:
            raise InvalidInput(
                f"the {label} {condition.name or ''} is made for {condition.family} models, but "
                f"the base model is {self.family}".replace("  ", " ")
            )
        config = condition.model.config
        unet_config = self.denoiser.config
        unet_channels = list(unet_config["block_out_channels"])
        mismatch: list[str] = []
        if condition.kind == "controlnet":
            for key in ("in_channels", "cross_attention_dim", "layers_per_block"):
                if config.get(key) != unet_config.get(key):
                    mismatch.append(key)
            if list(config.block_out_channels) != unet_channels:
                mismatch.append("block_out_channels")
            if len(config.down_block_types) != len(unet_config["down_block_types"]):
                mismatch.append("down_block_types")
            # Its condition encoder halves the image once per extra stage, down to the latent grid.
            if 2 ** (len(config.conditioning_embedding_out_channels) - 1) != self.vae_scale_factor:
                mismatch.append("conditioning_embedding_out_channels")
        else:
            channels = list(config.channels)
            common = min(len(channels), len(unet_channels))
            if channels[:common] != unet_channels[:common]:
                mismatch.append("channels")
            expected = self.vae_scale_factor * 2**self.adapter_extra_halvings
            if config.downscale_factor != expected:
                mismatch.append("downscale_factor")
        if mismatch:
            raise InvalidInput(
                f"the {label} does not match the base model's UNet ({', '.join(mismatch)} differ)"
            )

    def start_condition(self, prepared: PreparedCondition) -> ConditionResiduals:
        # Adapter features are encoded here, once for the whole run.
        return _UNetConditionResiduals(ConditionRun(prepared, self.device, self.dtype))

    # -- latents ---------------------------------------------------------------------------

    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Center-crop to the aspect, resize, and take the VAE posterior mean × scaling factor."""
        image = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
        pixels = self.pipeline.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(self.device, self.vae.dtype)
        latents: torch.Tensor = self.vae.encode(pixels).latent_dist.mean
        scaling: float = self.vae.config.scaling_factor  # the pipeline's components are untyped
        return (latents * scaling).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> Iterator[Image.Image]:
        # One image at a time keeps the VAE's peak memory independent of the number of rows.
        # torch leaves Tensor.split unannotated.
        for row in latents.split(1):  # type: ignore[no-untyped-call]
            decoded = self.vae.decode(
                row.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False
            )[0]
            yield from self.pipeline.image_processor.postprocess(decoded, output_type="pil")
