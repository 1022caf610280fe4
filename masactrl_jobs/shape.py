"""What a model is shaped like, and the control defaults that follow from its shape.

The loaded checkpoint is the source of truth: a worker (or ``masactrl synthesize``) measures
its family, self-attention block count, native size, size multiple and prediction type from the
model it loaded (:class:`ModelShape`) and the rest of the system validates against that.
Pruned and distilled checkpoints (BK-SDM, segmind's small-sd/tiny-sd) have other block counts
than SD 1.5's 16, other levels and sometimes no mid block, so no table may speak for a model.

Two kinds of number remain, each with one home here:

- **Defaults are rules over the shape.** The MasaCtrl paper starts the control at step 4 (clipped
  to shorter runs) and at block 10 of SD 1.5's 16, the first block of the decoder's later half.
  :func:`default_start_layer` keeps that *depth* on any model: ``round(blocks × 10 / 16)``, so
  44 of SDXL's 70 and 4 of a 7-block model. An operator (catalog entry) or the checkpoint
  (``masactrl.json``) may declare other values; those are choices, checked against the model.
- **Reference shapes** are what each family's reference checkpoint (SD 1.5, SDXL base) measures.
  The torch-free gateway assumes them for a catalog entry that declares nothing, only until a
  live worker of that model has reported what it measured. Workers never use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_START_STEP",
    "FAMILY_REFERENCE_SHAPES",
    "PAPER_BLOCK_COUNT",
    "PAPER_START_LAYER",
    "SHAPE_FIELDS",
    "Family",
    "ModelShape",
    "PredictionType",
    "default_start_layer",
]

Family = Literal["sd", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]

# The paper's start step: the first steps lay out the image; from step 4 on, targets may read the
# source's content without copying its layout.
DEFAULT_START_STEP = 4
# The paper's start layer 10 of SD 1.5's 16 self-attention blocks, as a fraction of the depth.
PAPER_START_LAYER, PAPER_BLOCK_COUNT = 10, 16

# The fields of a catalog entry that describe the model rather than a choice about it.
SHAPE_FIELDS = ("block_count", "native_width", "native_height", "size_multiple")

FAMILY_REFERENCE_SHAPES: dict[str, dict[str, int]] = {
    # SD 1.5: 6 down + 1 mid + 9 up blocks; VAE factor 8 × 2**3 UNet downsamplers.
    "sd": {"block_count": 16, "native_width": 512, "native_height": 512, "size_multiple": 64},
    # SDXL base: 4 + 20 down, 10 mid, 30 + 6 up blocks; VAE factor 8 × 2**2 downsamplers.
    "sdxl": {"block_count": 70, "native_width": 1024, "native_height": 1024, "size_multiple": 32},
}


def default_start_layer(block_count: int) -> int:
    """The paper's start layer kept at the same depth of a model with ``block_count`` blocks."""
    if block_count < 1:
        raise ValueError(f"a model needs at least one self-attention block, got {block_count}")
    return min(round(block_count * PAPER_START_LAYER / PAPER_BLOCK_COUNT), block_count - 1)


class ModelShape(BaseModel):
    """What a loaded model measures; workers report it through the job store."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    family: Family
    block_count: int = Field(gt=0, description="Self-attention blocks, in execution order.")
    native_width: int = Field(gt=0)
    native_height: int = Field(gt=0)
    size_multiple: int = Field(gt=0, description="Widths and heights must be multiples of it.")
    prediction_type: PredictionType | None = None

    @classmethod
    def from_description(cls, described: Mapping[str, Any]) -> ModelShape:
        """The shape in an engine's ``describe()`` (``masactrl_core.MasaCtrlEngine``)."""
        width, height = described["native_size"]
        return cls(
            family=described["family"],
            block_count=described["block_count"],
            native_width=width,
            native_height=height,
            size_multiple=described["size_multiple"],
            prediction_type=described.get("prediction_type"),
        )

    def values(self) -> dict[str, int]:
        """The fields a catalog entry may also declare (:data:`SHAPE_FIELDS`)."""
        return {name: getattr(self, name) for name in SHAPE_FIELDS}
