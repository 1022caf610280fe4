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
- **Families may declare their own default control** where their blocks carry layout and
  appearance elsewhere than a UNet's. The engine's backbone declares it (FLUX.1: from the first
  single-stream block, after the double-stream blocks that fix the layout; docs/engine.md says
  why) and a worker reports the default its engine computed with the shape, which the catalog
  then follows wherever an entry declares none. Until then, the gateway assumes the family
  reference's (:data:`FAMILY_REFERENCE_CONTROL`).
- **Reference shapes** are what each family's reference checkpoint (SD 1.5, SDXL base, SD3
  Medium, FLUX.1 [dev]) measures. The torch-free gateway assumes them for a catalog entry that
  declares nothing, only until a live worker of that model has reported what it measured. Workers
  never use them.

What the engine can do differs by family, and that is a declared fact about the engine rather
than a measurement of a checkpoint: :data:`FAMILY_FEATURES` says it for the torch-free gateway,
CLI and playground, and a worker checks the loaded engine's backbone agrees at start-up
(``worker.engine_loader.measured_entry``). Today the MM-DiT families (``sd3``, ``flux``) run
synthesis and editing but no layout conditions (ControlNets, T2I-Adapters) and so no sequences,
and no automatic masks (they have no cross-attention whose word maps a UNet's masks read; drawn
masks run), and FLUX.1 is guidance-distilled: its guidance scale is an input of the model, it has no
unconditional rows, so a negative prompt would have no effect and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_START_STEP",
    "FAMILY_FEATURES",
    "FAMILY_GPU_DTYPE",
    "FAMILY_REFERENCE_CONTROL",
    "FAMILY_REFERENCE_SHAPES",
    "FamilyFeatures",
    "PAPER_BLOCK_COUNT",
    "PAPER_START_LAYER",
    "SHAPE_FIELDS",
    "Family",
    "MeasuredPrediction",
    "ModelShape",
    "PredictionType",
    "default_start_layer",
]

Family = Literal["sd", "sdxl", "sd3", "flux"]
# What a single-file SD checkpoint may be declared to predict (catalog ``prediction_type``).
PredictionType = Literal["epsilon", "v_prediction"]
# What a loaded model is measured to predict: also ``flow``, the velocity of the flow-matching
# families (SD3, FLUX.1).
MeasuredPrediction = Literal["epsilon", "v_prediction", "flow"]

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
    # SD3 Medium: 24 joint transformer blocks; VAE factor 8 × patch size 2.
    "sd3": {"block_count": 24, "native_width": 1024, "native_height": 1024, "size_multiple": 16},
    # FLUX.1 [dev] and [schnell]: 19 double-stream then 38 single-stream blocks; VAE factor 8 ×
    # the 2×2 packing of latents into tokens.
    "flux": {"block_count": 57, "native_width": 1024, "native_height": 1024, "size_multiple": 16},
}

# The default control of each family's reference checkpoint where the family declares its own
# rule (the engine's backbone: ``masactrl_core.backbones``); other families follow the depth rule.
FAMILY_REFERENCE_CONTROL: dict[str, dict[str, int]] = {
    # FLUX.1 [dev]: from block 19, the first single-stream block, after step 4.
    "flux": {"default_start_step": 4, "default_start_layer": 19},
}


# The weights dtype a family runs in on a GPU when none is configured (else float16): FLUX.1 was
# trained in bfloat16 and its activations overflow float16.
FAMILY_GPU_DTYPE: dict[str, str] = {"flux": "bfloat16"}


class FamilyFeatures(BaseModel):
    """What the engine offers on one family (the same for every checkpoint of it)."""

    model_config = ConfigDict(frozen=True)

    layout_conditions: bool = Field(
        description="Whether requests may name a layout condition model (ControlNet, T2I-Adapter)."
    )
    sequences: bool = Field(description="Whether the model runs sequences (`/v1/sequences`).")
    automatic_masks: bool = Field(
        description="Whether `control.mask.mode` may be `auto` (masks from the attention maps "
        "of a word); drawn (`manual`) masks run on every family."
    )
    negative_prompt: bool = Field(
        description="Whether a negative prompt has an effect: false on guidance-distilled "
        "models, whose guidance scale is an input of the model rather than classifier-free "
        "guidance against a negative prompt."
    )
    unavailable: str | None = Field(
        default=None,
        description="Why the features marked false are missing, in one sentence.",
    )


_MMDIT_UNAVAILABLE = (
    "layout conditions and sequences are not available on {family} models yet: MasaCtrl runs "
    "synthesis and editing on their transformer blocks, but no layout condition model is wired "
    "to them"
)

FAMILY_FEATURES: dict[str, FamilyFeatures] = {
    "sd": FamilyFeatures(
        layout_conditions=True, sequences=True, automatic_masks=True, negative_prompt=True
    ),
    "sdxl": FamilyFeatures(
        layout_conditions=True, sequences=True, automatic_masks=True, negative_prompt=True
    ),
    "sd3": FamilyFeatures(
        layout_conditions=False,
        sequences=False,
        automatic_masks=False,
        negative_prompt=True,
        unavailable=_MMDIT_UNAVAILABLE.format(family="SD3"),
    ),
    # FLUX.1 is guidance-distilled: one row per image, the guidance scale an input of the model.
    "flux": FamilyFeatures(
        layout_conditions=False,
        sequences=False,
        automatic_masks=False,
        negative_prompt=False,
        unavailable=_MMDIT_UNAVAILABLE.format(family="FLUX.1")
        + "; FLUX.1 is guidance-distilled, so a negative prompt has no effect",
    ),
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
    prediction_type: MeasuredPrediction | None = None
    # The engine's default control on this model (its family's rule over the measured shape, or
    # the checkpoint's masactrl.json); None from workers that predate the report.
    default_start_step: int | None = Field(default=None, ge=0)
    default_start_layer: int | None = Field(default=None, ge=0)

    @classmethod
    def from_description(cls, described: Mapping[str, Any]) -> ModelShape:
        """The shape in an engine's ``describe()`` (``masactrl_core.MasaCtrlEngine``)."""
        width, height = described["native_size"]
        control = described.get("default_control") or {}
        return cls(
            family=described["family"],
            block_count=described["block_count"],
            native_width=width,
            native_height=height,
            size_multiple=described["size_multiple"],
            prediction_type=described.get("prediction_type"),
            default_start_step=control.get("start_step"),
            default_start_layer=control.get("start_layer"),
        )

    def values(self) -> dict[str, int]:
        """The fields a catalog entry may also declare (:data:`SHAPE_FIELDS`)."""
        return {name: getattr(self, name) for name in SHAPE_FIELDS}
