"""Mask-guided mutual self-attention: which source tokens each target token may read.

A target token inside target region k reads only the source tokens inside source region k; a
target token outside every target region reads only the source tokens outside every source region
(the background pair). Regions come from the caller (manual masks) or from cross-attention maps of
a word (automatic masks). Everything here works on one controlled layer's token grid at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from masactrl_core.errors import InvalidInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MaskImage = Union[Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007 - a runtime alias

__all__ = [
    "MaskConfig",
    "MaskImage",
    "ManualMasks",
    "RegionPlan",
    "WordMasks",
    "binarize",
    "crop_to_aspect",
    "plan_regions",
    "resize_nearest",
    "token_grid",
]

MAX_REGIONS = 8


@dataclass(frozen=True)
class MaskConfig:
    """Mask options for ``synthesize`` / ``edit``: manual region pairs *or* one word pair.

    ``regions``: ``[(source_mask, target_mask), ...]``, images of any resolution (PIL images,
    arrays or tensors; float values in [0, 1], 8-bit integers in 0..255, or booleans), binarized at
    0.5. One target mask serves every target image. ``source_word`` / ``target_word``: words or
    phrases of the source and target prompts whose cross-attention maps, thresholded at
    ``threshold`` after min–max normalization, become the masks.
    """

    regions: Sequence[tuple[MaskImage, MaskImage]] = ()
    source_word: str | None = None
    target_word: str | None = None
    threshold: float = 0.1

    @property
    def automatic(self) -> bool:
        return self.source_word is not None or self.target_word is not None

    def check(self) -> None:
        """Raise :class:`InvalidInput` for a configuration that cannot run."""
        if self.automatic and len(self.regions):
            raise InvalidInput("give either mask regions or mask words, not both")
        if self.automatic:
            if not (self.source_word or "").strip() or not (self.target_word or "").strip():
                raise InvalidInput("automatic masks need both a source word and a target word")
            if not 0.0 <= self.threshold <= 1.0:
                raise InvalidInput(f"the mask threshold must be in [0, 1], got {self.threshold}")
            return
        if not 1 <= len(self.regions) <= MAX_REGIONS:
            raise InvalidInput(
                f"give between 1 and {MAX_REGIONS} (source mask, target mask) pairs, "
                f"got {len(self.regions)}"
            )
        for pair in self.regions:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidInput("each mask region must be a (source mask, target mask) pair")


# --- geometry --------------------------------------------------------------------------------


def token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The h × w grid of a layer with ``tokens`` tokens on a latent of size ``latent_hw``.

    Every level of the UNet halves both sides, so the grid keeps the latent's aspect:
    h = sqrt(tokens · H / W). Grids need not be square.
    """
    height, width = latent_hw
    h = max(1, round(math.sqrt(tokens * height / width)))
    if tokens % h:
        raise ValueError(f"{tokens} tokens do not form a grid of aspect {height}:{width}")
    return h, tokens // h


def binarize(mask: MaskImage, name: str = "mask") -> torch.Tensor:
    """A (H, W) boolean tensor: foreground where the value is at least 0.5, at full resolution."""
    if isinstance(mask, Image.Image):
        values = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    else:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        if not isinstance(mask, torch.Tensor):
            raise InvalidInput(f"{name} must be an image, a numpy array or a tensor")
        mask = mask.detach().cpu()
        if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
            mask = mask.squeeze(0) if mask.shape[0] == 1 else mask.squeeze(-1)
        if mask.dtype == torch.bool or mask.dtype.is_floating_point:
            values = mask.float()
        else:  # integers are 8-bit intensities, as in a grayscale image file
            values = mask.float() / 255.0
    if values.ndim != 2 or values.numel() == 0:
        raise InvalidInput(f"{name} must be a 2-D image, got shape {tuple(values.shape)}")
    return values >= 0.5


def crop_to_aspect(mask: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Center-crop a full-resolution mask to the run's aspect, as the edited image is cropped."""
    mask_height, mask_width = mask.shape
    if mask_width * height == mask_height * width:
        return mask
    if mask_width * height > mask_height * width:  # too wide
        keep = max(1, round(mask_height * width / height))
        left = (mask_width - keep) // 2
        return mask[:, left : left + keep]
    keep = max(1, round(mask_width * height / width))
    top = (mask_height - keep) // 2
    return mask[top : top + keep, :]


def resize_nearest(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) boolean mask to ``grid``, flattened to tokens."""
    resized = F.interpolate(mask[None, None].float(), size=grid, mode="nearest")
    return resized[0, 0].flatten() > 0.5


# --- routing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionPlan:
    """One target image's routing at one grid: (target query tokens, source key tokens) pairs.

    Only groups with at least one target token are listed, so an attention is computed only for
    the tokens that use it. ``None`` in place of an index tensor means every token.
    """

    groups: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]


def _indices(selected: torch.Tensor) -> torch.Tensor | None:
    return None if bool(selected.all()) else selected.nonzero().flatten()


def plan_regions(source: torch.Tensor, target: torch.Tensor) -> RegionPlan | None:
    """Routing from (G, N) boolean region stacks whose last row is the background.

    Returns ``None`` when a non-empty target group has an empty source counterpart: those target
    tokens would attend to nothing (a softmax over no keys is NaN).
    """
    groups = []
    for source_region, target_region in zip(source, target, strict=True):
        if not bool(target_region.any()):
            continue
        if not bool(source_region.any()):
            return None
        groups.append((_indices(target_region), _indices(source_region)))
    return RegionPlan(tuple(groups))


def with_background(regions: torch.Tensor) -> torch.Tensor:
    """(K, N) foreground regions -> (K + 1, N) with the background (outside every region) last."""
    return torch.cat([regions, ~regions.any(dim=0, keepdim=True)])


def _to_device(index: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if index is None else index.to(device)


def _as_image(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray(mask.to(torch.uint8).mul(255).cpu().numpy(), mode="L")


# --- manual masks ----------------------------------------------------------------------------


class ManualMasks:
    """The caller's region pairs, binarized at full resolution, resized per grid on demand."""

    def __init__(
        self,
        source: list[torch.Tensor],
        target: list[torch.Tensor],
        width: int,
        height: int,
        device: torch.device,
    ) -> None:
        self.source = source
        self.target = target
        self.width = width
        self.height = height
        self.device = device
        self._plans: dict[tuple[int, int], RegionPlan | None] = {}

    @classmethod
    def prepare(
        cls, config: MaskConfig, width: int, height: int, device: torch.device
    ) -> ManualMasks:
        """Binarize each mask at its own resolution and crop it to the run's aspect."""
        source, target = [], []
        for k, (source_mask, target_mask) in enumerate(config.regions):
            source.append(crop_to_aspect(binarize(source_mask, f"source mask {k}"), width, height))
            target.append(crop_to_aspect(binarize(target_mask, f"target mask {k}"), width, height))
        for k, (source_mask, target_mask) in enumerate(zip(source, target, strict=True)):
            if bool(target_mask.any()) and not bool(source_mask.any()):
                raise InvalidInput(f"source mask {k} selects nothing while target mask {k} does")
        masks = cls(source, target, width, height, device)
        for side, regions in (("source", source), ("target", target)):
            masks._check_overlap(side, regions)
        return masks

    @property
    def count(self) -> int:
        return len(self.source)

    def regions(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K + 1, h·w) source and target region stacks at ``grid``, background last."""
        source = torch.stack([resize_nearest(m, grid) for m in self.source])
        target = torch.stack([resize_nearest(m, grid) for m in self.target])
        return with_background(source), with_background(target)

    def plan(self, grid: tuple[int, int]) -> RegionPlan | None:
        if grid not in self._plans:
            source, target = self.regions(grid)
            plan = plan_regions(source, target)
            if plan is not None:
                plan = RegionPlan(
                    tuple(
                        (_to_device(query, self.device), _to_device(key, self.device))
                        for query, key in plan.groups
                    )
                )
            self._plans[grid] = plan
        return self._plans[grid]

    def _check_overlap(self, side: str, regions: list[torch.Tensor]) -> None:
        # Masks of one shape are compared pixel by pixel; all of them also at the image size.
        for grid in {(m.shape[0], m.shape[1]) for m in regions} | {(self.height, self.width)}:
            same = [
                (k, m if tuple(m.shape) == grid else resize_nearest(m, grid).view(grid))
                for k, m in enumerate(regions)
            ]
            self._raise_on_overlap(side, same, f"{grid[1]}x{grid[0]}")

    @staticmethod
    def _raise_on_overlap(side: str, regions: list[tuple[int, torch.Tensor]], where: str) -> None:
        for i, (a, mask_a) in enumerate(regions):
            for b, mask_b in regions[i + 1 :]:
                if bool((mask_a & mask_b).any()):
                    raise InvalidInput(
                        f"{side} masks {a} and {b} overlap (at {where}); the regions of one side "
                        "must not overlap"
                    )

    def check_grids(self, grids: dict[tuple[int, int], int]) -> None:
        """Before sampling: every controlled grid (-> a block using it) must route every token."""
        for grid, block in sorted(grids.items()):
            source, target = self.regions(grid)
            where = f"the {grid[1]}x{grid[0]} token grid of block {block}"
            self._raise_on_overlap("source", list(enumerate(source[:-1])), where)
            self._raise_on_overlap("target", list(enumerate(target[:-1])), where)
            for k in range(self.count + 1):
                if bool(target[k].any()) and not bool(source[k].any()):
                    if k == self.count:
                        raise InvalidInput(
                            f"the source background (outside every source mask) is empty at "
                            f"{where} while the target background is not"
                        )
                    raise InvalidInput(
                        f"source mask {k} selects no token at {where} while target mask {k} "
                        "does; enlarge it or start the control at a later layer"
                    )

    def images(self, targets: int) -> dict[str, Image.Image]:
        """The masks used, binarized and cropped, at the image size (nearest)."""
        size = (self.height, self.width)
        out = {}
        for k, mask in enumerate(self.source):
            out[f"source_region_{k}"] = _as_image(resize_nearest(mask, size).view(size))
        for i in range(targets):
            for k, mask in enumerate(self.target):
                out[f"target_{i}_region_{k}"] = _as_image(resize_nearest(mask, size).view(size))
        return out


# --- automatic masks -------------------------------------------------------------------------


@dataclass
class WordMasks:
    """Masks from the cross-attention maps of a word, recomputed from this step's maps.

    ``token_weights[i]`` selects the word's token positions in image i's prompt (image 0 is the
    source). ``map_blocks`` are the blocks whose cross-attention runs on ``map_grid``, a quarter of
    the latent grid. Maps are recorded per block so that a chunked batch sees the same maps as one
    batch: the mask at block L uses exactly the map blocks numbered below L.
    """

    token_weights: torch.Tensor
    threshold: float
    map_grid: tuple[int, int]
    map_blocks: tuple[int, ...]
    width: int
    height: int
    maps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    # Keyed by (map blocks, grid, image).
    _cache: dict[tuple[tuple[int, ...], tuple[int, int], int], RegionPlan | None] = field(
        default_factory=dict
    )
    _last: dict[int, torch.Tensor] = field(default_factory=dict)

    def begin_step(self) -> None:
        self.maps.clear()
        self._cache.clear()

    def record(self, block: int, images: list[int], maps: torch.Tensor) -> None:
        """Store (R, N) word maps (heads averaged, word tokens summed) of ``images``."""
        per_image = self.maps.setdefault(block, {})
        for image, word_map in zip(images, maps, strict=True):
            per_image[image] = word_map.float()

    def mask(self, blocks: tuple[int, ...], image: int, grid: tuple[int, int]) -> torch.Tensor:
        """Image ``image``'s mask at ``grid`` from the maps of ``blocks``."""
        averaged = torch.stack([self.maps[b][image] for b in blocks]).mean(dim=0)
        low, high = averaged.min(), averaged.max()
        # A constant map has no object to find: it selects nothing rather than dividing by zero.
        normalized = (
            (averaged - low) / (high - low) if high > low else torch.zeros_like(averaged)
        ).view(self.map_grid)
        selected = normalized >= self.threshold
        self._last[image] = selected
        return resize_nearest(selected, grid)

    def plan(self, layer: int, grid: tuple[int, int], image: int) -> RegionPlan | None:
        """Routing of target image ``image`` at block ``layer``; ``None`` means unmasked."""
        blocks = tuple(
            b
            for b in self.map_blocks
            if b < layer and b in self.maps and 0 in self.maps[b] and image in self.maps[b]
        )
        if not blocks:  # no map of this step exists yet at this layer
            return None
        key = (blocks, grid, image)
        if key not in self._cache:
            source = self.mask(blocks, 0, grid)
            target = self.mask(blocks, image, grid)
            self._cache[key] = plan_regions(
                torch.stack([source, ~source]), torch.stack([target, ~target])
            )
        return self._cache[key]

    def images(self, targets: int) -> dict[str, Image.Image]:
        """The latest masks computed (last controlled step), at the image size (nearest)."""
        size = (self.height, self.width)
        out = {}
        for image, name in [(0, "source_region_0")] + [
            (i + 1, f"target_{i}_region_0") for i in range(targets)
        ]:
            if image in self._last:
                out[name] = _as_image(resize_nearest(self._last[image], size).view(size))
        return out


def word_positions(
    tokenizer: PreTrainedTokenizerBase, prompt: str, word: str, role: str
) -> list[int]:
    """Token positions of ``word`` (a word or phrase) in ``prompt`` as the text encoder sees it."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    word_ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
    length = len(word_ids)
    positions: list[int] = []
    if length:
        for start in range(len(ids) - length + 1):
            if ids[start : start + length] == word_ids:
                positions.extend(range(start, start + length))
    if not positions:
        raise InvalidInput(f"the {role} word {word!r} is not in the {role} prompt {prompt!r}")
    return sorted(set(positions))
