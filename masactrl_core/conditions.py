"""Layout conditions: a ControlNet or a T2I-Adapter steering the images MasaCtrl denoises.

MasaCtrl decides *what* a target looks like (it reads the source's keys and values); a condition
decides *where* things go (an edge map, a pose, a depth map). The two compose per UNet row:

* Each image of a run (0 = the source, k = target k) has a condition image or none. Every UNet
  row denoising an image that has one receives the condition model's residuals, in both guidance
  halves; rows of other images receive none. The source has none unless a synthesis gives one.
* A ControlNet runs on its conditioned rows only, each with that row's own latent input and text
  conditioning (SDXL: with its added conditioning too), and its outputs go to the UNet as
  ``down_block_additional_residuals`` / ``mid_block_additional_residual``. A UNet batch that
  mixes conditioned and unconditioned rows gets zero residuals on the unconditioned ones: adding
  zero is exact, so the engine's shared source row and max_batch chunks keep giving the plain
  path's images.
* A T2I-Adapter's features depend on the image alone, so they are computed once per run and
  passed as ``down_intrablock_additional_residuals``.
* Both kinds are weighted at step ``i`` by ``scale × keep_i``, where ``keep_i`` is diffusers'
  ``controlnet_keep``: 0 when ``i / steps < start`` or ``(i + 1) / steps > end``, else 1. A
  step whose weight is 0 runs no condition model at all (its residuals would be zeros).

Whether a condition model fits the base model (family, channels, layers, how far its encoder
shrinks the image) is the base model's backbone's call: ``Backbone.check_condition``
(:mod:`masactrl_core.backbones`), which also names the family a condition model is made for.

Condition images are converted to RGB (grayscale for a one-channel adapter), center-cropped to the
output aspect and resized with Lanczos exactly as the edited photo is, so an edge map made from
that photo stays aligned with it; then scaled to [0, 1].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from masactrl_core.errors import InvalidInput, ModelLoadError

ConditionKind = Literal["controlnet", "adapter"]
_CLASSES: dict[str, ConditionKind] = {"ControlNetModel": "controlnet", "T2IAdapter": "adapter"}


@dataclass(frozen=True)
class ConditionModel:
    """A loaded ControlNet or T2I-Adapter, checked against the base model it was loaded for."""

    # A diffusers ControlNetModel or T2IAdapter (untyped in diffusers, so Any here).
    model: Any
    kind: ConditionKind
    family: str
    name: str = ""

    @property
    def image_channels(self) -> int:
        """Channels of the condition images the model takes (3, or 1 for some adapters)."""
        config = self.model.config
        if self.kind == "controlnet":
            return int(config.conditioning_channels)
        return int(config.in_channels)


@dataclass(frozen=True)
class Condition:
    """Layout guidance for one run.

    ``images``: one per target prompt, in order, or one shared by all targets (alone or in a
    list). ``source_image``
    conditions the source too (synthesis only: an edit's source is the inverted photo). The
    residuals are multiplied by ``scale`` during the fraction ``[start, end]`` of the steps.
    """

    model: ConditionModel
    images: Sequence[Image.Image] | Image.Image
    source_image: Image.Image | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class PreparedCondition:
    """A condition checked against one run: pixels per image index and each step's weight.

    Image 0 is the source, k is target k; ``weights[i]`` is ``scale × keep_i``.
    """

    model: ConditionModel
    pixels: dict[int, torch.Tensor]
    weights: list[float]


def condition_family(kind: ConditionKind, config: Mapping[str, Any]) -> str:
    """The model family a condition model is made for; each backbone knows its own."""
    # Imported here: the backbones import this module for the condition runs they drive.
    from masactrl_core.backbones import condition_family as family_of

    return family_of(kind, config)


def read_condition_config(path_or_id: str) -> tuple[ConditionKind, dict[str, Any]]:
    """The kind (from the config's class name) and config of a condition model."""
    from diffusers import ControlNetModel

    if os.path.isdir(path_or_id) and not os.path.isfile(os.path.join(path_or_id, "config.json")):
        raise ModelLoadError(f"{path_or_id} is not a diffusers model folder (no config.json)")
    try:
        config = ControlNetModel.load_config(path_or_id)
    except Exception as error:  # hub or file errors: one sentence for the caller
        raise ModelLoadError(f"cannot load condition model {path_or_id}: {error}") from error
    class_name = config.get("_class_name", "")
    if class_name not in _CLASSES:
        raise ModelLoadError(
            f"{path_or_id} is a {class_name or 'model of unknown class'}, not a ControlNetModel "
            "or T2IAdapter"
        )
    return _CLASSES[class_name], dict(json.loads(json.dumps(config, default=str)))


def load_condition_model(
    path_or_id: str | os.PathLike[str], *, device: torch.device, dtype: torch.dtype
) -> ConditionModel:
    """Load a ControlNetModel or T2IAdapter (folder or hub id); the class comes from its config."""
    from diffusers import ControlNetModel, T2IAdapter

    name = str(path_or_id)
    kind, config = read_condition_config(name)
    if kind == "controlnet" and config.get("global_pool_conditions"):
        raise InvalidInput(
            f"{name} is a ControlNet with pooled conditions (guess mode), which is not supported"
        )
    loader = ControlNetModel if kind == "controlnet" else T2IAdapter
    try:
        model = loader.from_pretrained(name, torch_dtype=dtype)  # type: ignore[no-untyped-call]
    except Exception as error:
        raise ModelLoadError(f"cannot load condition model {name}: {error}") from error
    model.to(device)
    model.eval()
    return ConditionModel(model, kind, condition_family(kind, config), name)


def condition_pixels(image: object, width: int, height: int, channels: int) -> torch.Tensor:
    """(1, channels, height, width) float32 in [0, 1]: cropped and resized like the photo."""
    if not isinstance(image, Image.Image):
        raise InvalidInput("condition images must be PIL images")
    mode = "L" if channels == 1 else "RGB"
    image = ImageOps.fit(image.convert(mode), (width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def controlnet_keep(steps: int, start: float, end: float) -> list[float]:
    """diffusers' per-step keep factors for a guidance window ``[start, end]``."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


class ConditionRun:
    """A prepared condition during its run: the images on the device, adapter features.

    The loop asks
    :meth:`unet_kwargs` for the extra UNet arguments of each UNet call, naming the image of every
    row; ``evaluations`` counts condition-model row evaluations (adapter: images encoded).
    """

    def __init__(
        self, prepared: PreparedCondition, device: torch.device, dtype: torch.dtype
    ) -> None:
        condition, images = prepared.model, prepared.pixels
        self.condition = condition
        self.weights = prepared.weights
        self.evaluations = 0
        # Images sharing one input share one tensor: encoded (adapter) once.
        self._pixels = {k: v.to(device, dtype) for k, v in images.items()}
        self._features: dict[int, list[torch.Tensor]] = {}
        self._adapter_rows: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._controlnet_rows: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        if condition.kind == "adapter":
            encoded: dict[int, list[torch.Tensor]] = {}
            for image, pixels in images.items():
                key = id(pixels)
                if key not in encoded:
                    encoded[key] = list(condition.model(self._pixels[image]))
                    self.evaluations += 1
                self._features[image] = encoded[key]

    @property
    def conditioned_images(self) -> frozenset[int]:
        return frozenset(self._pixels)

    def unet_kwargs(
        self,
        step: int,
        row_images: Sequence[int],
        sample: torch.Tensor,
        timestep: torch.Tensor,
        embeds: torch.Tensor,
        added: Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        """Residual arguments for a UNet call whose row ``r`` denoises image ``row_images[r]``."""
        weight = self.weights[step]
        rows = [r for r, image in enumerate(row_images) if image in self._pixels]
        if weight == 0 or not rows:
            return {}
        if self.condition.kind == "adapter":
            features = self._adapter_features(tuple(row_images))
            return {"down_intrablock_additional_residuals": [f * weight for f in features]}
        index, pixels = self._controlnet_inputs(tuple(row_images), rows)
        down, mid = self.condition.model(
            sample[index],
            timestep,
            encoder_hidden_states=embeds[index],
            controlnet_cond=pixels,
            conditioning_scale=weight,
            added_cond_kwargs={k: v[index] for k, v in added.items()} or None,
            return_dict=False,
        )
        self.evaluations += len(rows)
        if len(rows) < len(row_images):
            down = [_scatter(d, index, len(row_images)) for d in down]
            mid = _scatter(mid, index, len(row_images))
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _controlnet_inputs(
        self, row_images: tuple[int, ...], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioned rows of a row layout and their pixels, cached per layout."""
        if row_images not in self._controlnet_rows:
            device = next(iter(self._pixels.values())).device
            self._controlnet_rows[row_images] = (
                torch.tensor(rows, device=device),
                torch.cat([self._pixels[row_images[r]] for r in rows]),
            )
        return self._controlnet_rows[row_images]

    def _adapter_features(self, row_images: tuple[int, ...]) -> list[torch.Tensor]:
        """Per-row adapter features of a row layout (zeros for unconditioned rows), cached."""
        if row_images not in self._adapter_rows:
            some = next(iter(self._features.values()))
            stacked = []
            for level, template in enumerate(some):
                rows = [
                    self._features[image][level]
                    if image in self._features
                    else torch.zeros_like(template)
                    for image in row_images
                ]
                stacked.append(torch.cat(rows))
            self._adapter_rows[row_images] = stacked
        return self._adapter_rows[row_images]


def _scatter(rows: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """``rows`` placed at ``index`` of a zero batch of ``batch`` rows."""
    full = rows.new_zeros((batch, *rows.shape[1:]))
    full[index] = rows
    return full


def prepare_condition(
    condition: object,
    *,
    targets: int,
    steps: int,
    width: int,
    height: int,
    editing: bool,
) -> PreparedCondition:
    """Check a condition against a run and convert its images (before any sampling)."""
    if not isinstance(condition, Condition):
        raise InvalidInput("condition must be a Condition")
    if not isinstance(condition.model, ConditionModel):
        raise InvalidInput("condition.model must be a ConditionModel (see load_condition_model)")
    if not math.isfinite(condition.scale):
        raise InvalidInput(f"the condition scale must be a finite number, got {condition.scale}")
    if not 0.0 <= condition.start < condition.end <= 1.0:
        raise InvalidInput(
            "the condition window must satisfy 0 <= start < end <= 1, "
            f"got start {condition.start} and end {condition.end}"
        )
    # A single image (not in a list) is the one shared by all targets.
    images = [condition.images] if isinstance(condition.images, Image.Image) else condition.images
    images = list(images)
    if len(images) not in (1, targets):
        raise InvalidInput(
            f"give one condition image per target prompt ({targets}) or one shared by all, "
            f"got {len(images)}"
        )
    if editing and condition.source_image is not None:
        raise InvalidInput(
            "an edit's source is the inverted photo and takes no condition image; "
            "leave source_image unset"
        )
    channels = condition.model.image_channels
    converted = [condition_pixels(image, width, height, channels) for image in images]
    pixels = {k: converted[0 if len(converted) == 1 else k - 1] for k in range(1, targets + 1)}
    if condition.source_image is not None:
        pixels[0] = condition_pixels(condition.source_image, width, height, channels)
    keep = controlnet_keep(steps, condition.start, condition.end)
    return PreparedCondition(condition.model, pixels, [condition.scale * k for k in keep])


__all__ = [
    "Condition",
    "ConditionModel",
    "ConditionRun",
    "PreparedCondition",
    "condition_family",
    "condition_pixels",
    "controlnet_keep",
    "load_condition_model",
    "prepare_condition",
]
