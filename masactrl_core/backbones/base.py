"""The backbone interface: everything the MasaCtrl sampler needs to know about one model family.

MasaCtrl itself is model-agnostic: rows of [source, targets] in guidance halves, chosen steps and
blocks whose self-attention reads the source's keys and values, masks over token grids, layout
conditions, anchoring. What differs per family lives behind :class:`Backbone`:

* **Loading**: which checkpoints it recognizes (:meth:`Backbone.recognizes`), which diffusers
  pipeline class loads them and with which arguments, what it refuses (an SDXL refiner).
* **Prompts**: :meth:`Backbone.conditioning` turns prompts and the negative prompt into a
  :class:`Conditioning` per row: the text embeddings plus any added conditioning the denoiser
  takes (SDXL: pooled embeddings and time ids), all with one row per prompt so the sampler can
  select, concatenate and compare rows without knowing what they hold.
* **The denoiser**: :meth:`Backbone.predict` calls it for a batch of rows, with a layout
  condition's residual arguments (:meth:`Backbone.condition_residuals`) where one is active.
* **Blocks**: ``layer_names`` are the processor names of the self-attention layers MasaCtrl may
  control, in execution order (block ``i`` is the ``i``-th to run); ``block_levels`` say how many
  times the latent grid has been halved before each (a transformer's patchify counts as
  halvings), from which :meth:`Backbone.block_grid` gives each block's token grid.
  :meth:`Backbone.map_layer` names the cross-attention whose maps automatic masks read, if any.
  The sampler installs diffusers attention processors under those names with
  ``denoiser.set_attn_processor``; it never parses them.
* **Latents**: shape, VAE encode and decode with the family's scaling, ``size_multiple`` and
  ``native_size``, all measured from the loaded modules, never from a table.
* **Its solver**: :meth:`Backbone.make_solver` builds the noise-schedule solver the checkpoint's
  scheduler config calls for (:mod:`masactrl_core.solvers`).

A family is one module with a subclass and one entry in the registry
(:mod:`masactrl_core.backbones`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from masactrl_core.conditions import ConditionModel, PreparedCondition
    from masactrl_core.runs import ControlConfig
    from masactrl_core.solvers.base import Solver

__all__ = ["Backbone", "ConditionResiduals", "Conditioning"]


@dataclass
class Conditioning:
    """Conditioning for a set of denoiser rows: prompt embeddings plus any added conditioning.

    Every tensor has one row per denoiser row, so rows can be selected, concatenated and
    compared whatever the family puts in ``added``.
    """

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, index: torch.Tensor | list[int]) -> Conditioning:
        return Conditioning(self.embeds[index], {k: v[index] for k, v in self.added.items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([p.embeds for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added},
        )

    def same_as(self, other: Conditioning) -> bool:
        return torch.equal(self.embeds, other.embeds) and all(
            torch.equal(v, other.added[k]) for k, v in self.added.items()
        )


class ConditionResiduals(Protocol):
    """A layout condition during one run, as the backbone feeds it to the denoiser."""

    @property
    def evaluations(self) -> int:
        """Condition-model row evaluations (or adapter encodings) so far."""
        ...

    def arguments(
        self,
        step: int,
        row_images: Sequence[int],
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
    ) -> dict[str, object]:
        """Extra denoiser arguments for a call whose row ``r`` denoises ``row_images[r]``."""
        ...


class Backbone(ABC):
    """One loaded model of a family: its prompts, denoiser, blocks and latents."""

    #: The registry key, recorded in run records and the catalog.
    family: ClassVar[str]

    #: Whether guidance runs the denoiser on unconditional rows beside the conditional ones
    #: (classifier-free guidance). A guidance-distilled model (FLUX.1 [dev]) takes the guidance
    #: scale as an input instead (:meth:`with_guidance`): its rows are the source and targets.
    classifier_free_guidance: ClassVar[bool] = True

    #: Whether layout conditions (ControlNet, T2I-Adapter) and sequences run on this family.
    supports_conditions: ClassVar[bool] = True

    #: The mutual-attention processor class for this family's controllable layers; ``None``:
    #: the UNet self-attention processor of :mod:`masactrl_core.attention`.
    mutual_attention: ClassVar[type | None] = None

    def __init__(
        self,
        pipeline: Any,
        *,
        denoiser: Any,
        layer_names: list[str],
        block_levels: list[int],
        latent_channels: int,
        vae_scale_factor: int,
        size_multiple: int,
        native_size: tuple[int, int],
    ) -> None:
        """A family's constructor measures its shape from the loaded modules and passes it here."""
        self.pipeline = pipeline
        self.vae: Any = pipeline.vae
        #: The network that owns the attention processors MasaCtrl installs.
        self.denoiser: Any = denoiser
        #: Processor names of the controllable self-attention layers, in execution order.
        self.layer_names = layer_names
        #: How many times the latent grid is halved before each block.
        self.block_levels = block_levels
        #: Channels of the latents the denoiser takes; pixels per latent cell.
        self.latent_channels = latent_channels
        self.vae_scale_factor = vae_scale_factor
        #: Image sides must be multiples of this (pixels); (width, height) the model was made for.
        self.size_multiple = size_multiple
        self.native_size = native_size

    # -- loading (class level: before a pipeline exists) -----------------------------------

    @classmethod
    @abstractmethod
    def from_pipeline(cls, pipeline: Any) -> Backbone:
        """The backbone of a loaded pipeline of this family, its shape measured."""

    @classmethod
    @abstractmethod
    def recognizes(cls, config: dict[str, Any]) -> bool:
        """Whether a checkpoint's ``model_index.json`` is of this family."""

    @classmethod
    def recognizes_condition(cls, kind: str, config: Mapping[str, Any]) -> bool:
        """Whether a condition model's config (``kind``: controlnet, adapter) is made for it."""
        return False

    @classmethod
    def check_config(cls, config: dict[str, Any], model: str) -> None:
        """Refuse a checkpoint of this family that MasaCtrl cannot use (:class:`ModelLoadError`).

        Every checkpoint the family recognizes is usable unless a family says otherwise.
        """
        return

    @classmethod
    @abstractmethod
    def pipeline_class(cls) -> type[DiffusionPipeline]:
        """The diffusers pipeline class that loads this family."""

    @classmethod
    def load_arguments(cls) -> dict[str, object]:
        """Extra ``from_pretrained`` / ``from_single_file`` arguments of the pipeline class."""
        return {}

    @abstractmethod
    def make_solver(self) -> Solver:
        """The noise-schedule solver for this checkpoint's scheduler config."""

    # -- shape ---------------------------------------------------------------------------

    @property
    def block_count(self) -> int:
        return len(self.layer_names)

    @property
    def device(self) -> torch.device:
        # The pipeline's execution device: the denoiser's, or with model CPU offload the device
        # its components move to when they run (they rest on the CPU).
        device: torch.device = self.pipeline._execution_device
        return device

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.denoiser.dtype
        return dtype

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose positions automatic masks' words are found at."""
        return self.pipeline.tokenizer

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(channels, h, w) of one image's latents."""
        factor = self.vae_scale_factor
        return self.latent_channels, height // factor, width // factor

    def image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(width, height) in pixels of latents of this model."""
        factor = self.vae_scale_factor
        return latents.shape[-1] * factor, latents.shape[-2] * factor

    def block_grid(self, block: int, width: int, height: int) -> tuple[int, int]:
        """The (h, w) token grid of block ``block`` for an image of this size."""
        scale = self.vae_scale_factor * 2 ** self.block_levels[block]
        # Each halving (stride 2, padding 1) rounds up: ceil of the exact ratio.
        return math.ceil(height / scale), math.ceil(width / scale)

    def default_control(self) -> ControlConfig:
        """The family's default start step and start layer on this model (its shape measured).

        The paper's start step and start depth (:func:`masactrl_core.runs.paper_start_layer`);
        a family whose blocks carry layout and appearance elsewhere declares its own.
        """
        from masactrl_core.runs import PAPER_START_STEP, ControlConfig, paper_start_layer

        return ControlConfig(
            start_step=PAPER_START_STEP, start_layer=paper_start_layer(self.block_count)
        )

    def with_guidance(self, cond: Conditioning, guidance_scale: float) -> Conditioning:
        """``cond`` with the guidance scale as a model input, for a guidance-distilled model."""
        return cond

    def map_layer(self, block: int) -> str | None:
        """The processor name of the text cross-attention beside block ``block``, if any."""
        return None

    # -- prompts ---------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Conditioning per prompt for images of ``size`` (width, height)."""

    def conditioning(
        self, prompts: Sequence[str], negative_prompt: str, size: tuple[int, int]
    ) -> tuple[Conditioning, Conditioning]:
        """Conditioning of ``prompts`` and the unconditional (negative-prompt) conditioning."""
        encoded = self.encode_prompts([*prompts, negative_prompt], size)
        n = len(prompts)
        return encoded.rows(list(range(n))), encoded.rows([n])

    # -- the denoiser ----------------------------------------------------------------------

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        residuals: dict[str, object] | None = None,
    ) -> torch.Tensor:
        """One denoiser call; ``residuals`` are a condition model's extra arguments."""

    @abstractmethod
    def check_condition(self, condition: ConditionModel) -> None:
        """Refuse a condition model made for another family or other shapes (InvalidInput)."""

    @abstractmethod
    def start_condition(self, prepared: PreparedCondition) -> ConditionResiduals:
        """A prepared condition, ready for one run on this model's device."""

    # -- latents ---------------------------------------------------------------------------

    @abstractmethod
    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Clean latents (1, C, h, w) of a photo, center-cropped to the aspect and resized."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> Iterator[Image.Image]:
        """One image per row of ``latents``, decoded one at a time as the caller iterates."""
