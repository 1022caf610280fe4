"""What the multimodal-diffusion-transformer backbones (``flux``, ``sd3``) share.

Both denoise 16-channel latents of an ``AutoencoderKL`` with a ``shift_factor`` and a
``scaling_factor`` (latents = (mean − shift) · scale, and back before decoding, as their
pipelines do), sample with flow-matching Euler, and, for now, run no layout conditions: a
ControlNet path for these transformers is not built, so conditions and sequences are refused
with one sentence (:attr:`supports_conditions` is False and the service reports it).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageOps

from masactrl_core.backbones.base import Backbone, ConditionResiduals
from masactrl_core.errors import InvalidInput

if TYPE_CHECKING:
    from masactrl_core.conditions import ConditionModel, PreparedCondition

__all__ = ["MMDiTBackbone"]


class MMDiTBackbone(Backbone):
    """A transformer over [text, image] tokens with a shifted, scaled 16-channel VAE."""

    supports_conditions = False

    @classmethod
    @abstractmethod
    def transformer_class(cls) -> Any:
        """The diffusers transformer class of the family (single-file loading converts into it)."""

    def _refuse_conditions(self) -> InvalidInput:
        return InvalidInput(f"layout conditions are not supported on {self.family} models yet")

    def check_condition(self, condition: ConditionModel) -> None:
        raise self._refuse_conditions()

    def start_condition(self, prepared: PreparedCondition) -> ConditionResiduals:
        raise self._refuse_conditions()

    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Center-crop, resize, VAE posterior mean, then the VAE's shift and scale."""
        image = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
        pixels = self.pipeline.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(self.device, self.vae.dtype)
        latents: torch.Tensor = self.vae.encode(pixels).latent_dist.mean
        shift: float = self.vae.config.shift_factor  # the pipeline's components are untyped
        scaling: float = self.vae.config.scaling_factor
        return ((latents - shift) * scaling).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> Iterator[Image.Image]:
        config = self.vae.config
        # One image at a time keeps the VAE's peak memory independent of the number of rows.
        for row in latents.split(1):  # type: ignore[no-untyped-call]
            scaled = row.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
            decoded = self.vae.decode(scaled, return_dict=False)[0]
            yield from self.pipeline.image_processor.postprocess(decoded, output_type="pil")
