"""What a MasaCtrl run takes and gives back: the control, the options, statistics and results.

These are plain values shared by the sampler (:mod:`masactrl_core.sampler`) and the engine's
facade (:mod:`masactrl_core.engine`, which re-exports them as the public API). None of them knows
a model family, a denoiser or a noise schedule: a block is a number in the backbone's execution
order, a step a number from 0 (the noisiest), and latents are whatever the backbone encodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from masactrl_core.errors import InvalidInput

__all__ = [
    "MAX_TARGETS",
    "CancelCheck",
    "ControlConfig",
    "EngineOptions",
    "ImageCallback",
    "InvertedImage",
    "MasaCtrlResult",
    "ProgressCallback",
    "RunStats",
    "SequenceResult",
]

ProgressCallback = Callable[[str, int, int], None]
CancelCheck = Callable[[], bool]
# Called with (index, image) as each image of a run is decoded.
ImageCallback = Callable[[int, Image.Image], None]

MAX_TARGETS = 8


# The paper's start step, and its start layer 10 of SD 1.5's 16 blocks as a depth: a rule of
# the model's shape, not a table of families (masactrl_jobs.shape states the same rule).
PAPER_START_STEP = 4
PAPER_START_DEPTH = 10 / 16


def paper_start_layer(block_count: int) -> int:
    """The paper's start layer kept at the same depth of a model with ``block_count`` blocks."""
    return min(round(block_count * PAPER_START_DEPTH), block_count - 1)


@dataclass(frozen=True)
class ControlConfig:
    """Where mutual self-attention applies: denoising steps and transformer blocks.

    Blocks are numbered 0..L-1 in the backbone's execution order (a UNet's: down, mid, up);
    step 0 is the noisiest.
    ``steps`` / ``layers`` lists override the ``start_step`` / ``start_layer`` ranges.
    ``start_step == steps`` (or ``steps=[]``) disables the control. ``start_layer=None`` is the
    model's default (``engine.default_control``): a depth of the model, not SD 1.5's block 10.
    """

    start_step: int = PAPER_START_STEP
    start_layer: int | None = None
    layers: Sequence[int] | None = None
    steps: Sequence[int] | None = None

    def resolve(self, num_steps: int, block_count: int) -> tuple[frozenset[int], frozenset[int]]:
        """The controlled steps and layers, checked against this run and model."""
        if self.steps is None:
            if not 0 <= self.start_step <= num_steps:
                raise InvalidInput(
                    f"start_step must be between 0 and {num_steps} (the number of steps), "
                    f"got {self.start_step}"
                )
            steps = frozenset(range(self.start_step, num_steps))
        else:
            bad = [s for s in self.steps if not 0 <= s < num_steps]
            if bad:
                raise InvalidInput(
                    f"control steps must be between 0 and {num_steps - 1}, got {bad}"
                )
            steps = frozenset(self.steps)
        if self.layers is None:
            if self.start_layer is None:
                start = paper_start_layer(block_count)
                return steps, frozenset(range(start, block_count))
            if not 0 <= self.start_layer < block_count:
                raise InvalidInput(
                    f"start_layer must be between 0 and {block_count - 1} "
                    f"(this model has {block_count} transformer blocks), got {self.start_layer}"
                )
            layers = frozenset(range(self.start_layer, block_count))
        else:
            bad = [layer for layer in self.layers if not 0 <= layer < block_count]
            if bad:
                raise InvalidInput(
                    f"control layers must be between 0 and {block_count - 1} "
                    f"(this model has {block_count} transformer blocks), got {bad}"
                )
            layers = frozenset(self.layers)
        return steps, layers


@dataclass(frozen=True)
class EngineOptions:
    """Switches for the optimizations; each gives the same images as the plain path."""

    share_source_branch: bool = True
    skip_redundant_guidance: bool = True
    max_batch: int = 16
    # Longest sequence a call accepts; memory is bounded by max_batch, time grows with frames.
    max_sequence_frames: int = 120

    def __post_init__(self) -> None:
        if self.max_batch < 2:
            raise ValueError("max_batch must be at least 2 (a source and a target)")
        if self.max_sequence_frames < 1:
            raise ValueError("max_sequence_frames must be at least 1")


@dataclass
class RunStats:
    unet_image_evals: int = 0
    # ControlNet row evaluations, or T2I-Adapter image encodings (once per distinct image).
    condition_evals: int = 0
    inversion_seconds: float = 0.0
    denoise_seconds: float = 0.0
    peak_memory_bytes: int | None = None


@dataclass
class InvertedImage:
    """x_T of a real image after inversion (the solver's steps, inverted), with what it depends on.

    ``trajectory`` (float32, shape (steps + 1, C, h, w)) holds the latents after each inversion
    step: ``trajectory[0]`` is the clean image, ``trajectory[steps]`` is x_T. Anchored editing
    resets the source to ``trajectory[steps - i]`` at denoising step ``i``. Inversions made
    before it existed, or stored without it, have ``None``.
    """

    latents: torch.Tensor
    steps: int
    width: int
    height: int
    source_prompt: str
    trajectory: torch.Tensor | None = None

    @property
    def has_trajectory(self) -> bool:
        return self.trajectory is not None

    def without_trajectory(self) -> InvertedImage:
        """The same inversion without its trajectory: a smaller cache entry, no anchoring."""
        return replace(self, trajectory=None)

    def to_safetensors_bytes(self) -> bytes:
        from safetensors.torch import save

        metadata = {
            "steps": str(self.steps),
            "width": str(self.width),
            "height": str(self.height),
            "source_prompt": self.source_prompt,
            # Readable without loading the tensors, so a cache can tell the two kinds apart.
            "trajectory": "true" if self.has_trajectory else "false",
        }
        tensors = {"latents": self.latents.detach().float().cpu().contiguous()}
        if self.trajectory is not None:
            tensors["trajectory"] = self.trajectory.detach().float().cpu().contiguous()
        return save(tensors, metadata)

    @classmethod
    def from_safetensors_bytes(cls, data: bytes) -> InvertedImage:
        from safetensors.torch import load

        tensors = load(data)
        # The format is an 8-byte length, then a JSON header holding our string metadata.
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
        return cls(
            latents=tensors["latents"],
            steps=int(metadata["steps"]),
            width=int(metadata["width"]),
            height=int(metadata["height"]),
            source_prompt=metadata["source_prompt"],
            trajectory=tensors.get("trajectory"),
        )


@dataclass
class MasaCtrlResult:
    source: Image.Image
    targets: list[Image.Image]
    stats: RunStats
    inverted: InvertedImage | None = None
    latents: torch.Tensor | None = None  # final [source, targets] latents, before decoding
    # With masks: the masks used, by name ("source_region_K", "target_I_region_K"), image-sized.
    masks: dict[str, Image.Image] | None = None


@dataclass
class SequenceResult:
    """A sequence's source image and one frame per condition frame, in the frames' order."""

    source: Image.Image
    frames: list[Image.Image]
    stats: RunStats
    inverted: InvertedImage | None = None
    latents: torch.Tensor | None = None  # final [source, frames] latents, before decoding
