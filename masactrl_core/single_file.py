"""Single-file checkpoints: one ``.safetensors`` file in an original (pre-diffusers) key layout.

Community models circulate as one file holding the UNet (``model.diffusion_model.*``), the VAE
(``first_stage_model.*``) and the text encoder(s) (``cond_stage_model.*`` for SD1.x/2.x,
``conditioner.embedders.*`` for SDXL). diffusers' ``from_single_file`` converts them; what it
cannot read from the file — every component's configuration and the tokenizers — comes from a
diffusers config folder: the one the caller names (loading is then fully offline), else the
family's reference repository that diffusers picks and keeps in the Hugging Face cache (offline
once cached, e.g. with ``HF_HUB_OFFLINE=1``).

Before anything is converted the file is inspected: a file that is not a checkpoint, an SDXL
refiner, or a file whose family differs from the declared one (or from the config folder's) is a
:class:`ModelLoadError` naming the file. Pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``)
can run arbitrary code while they load, so they are refused unless ``allow_pickle`` is set.

FLUX.1 and SD3 files are recognized by their transformer's keys, with or without the
``model.diffusion_model.`` prefix: Black Forest Labs' ``double_blocks.*`` / ``single_blocks.*``
(FLUX.1 [dev] when it has the guidance embedding ``guidance_in.*``, else [schnell]) and Stability
AI's ``joint_blocks.*`` (SD3 medium; SD3.5 medium by its dual-attention ``attn2`` layers, SD3.5
large by its 38th block). Only the transformer is read from the file: it is converted by
diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel.from_single_file`` with the
config of the config folder's (or reference repository's) ``transformer/``, and every other
component (text encoders, VAE, tokenizers, scheduler) is loaded, weights included, from that
folder or repository by the family's pipeline class. A community FLUX.1 file is the transformer
alone; the text encoders and VAE that an all-in-one SD3 file may hold are not read.

The prediction type (SD and SDXL only; the transformers are flow-matching models) is, in order:
the one declared by the caller; ``v_prediction`` when the file carries the ``v_pred`` marker key
that v-prediction community checkpoints add; else the config's.
SD 2.x 768-v and 512-base files have the same keys, so a 2.x file loaded without a config or a
declaration gets the reference config of 2.1 (v-prediction): declare ``epsilon`` for a base model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masactrl_core.errors import ModelLoadError
from masactrl_core.weights import PICKLE_SUFFIXES, SAFE_SUFFIXES

if TYPE_CHECKING:
    import torch
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFE_SUFFIXES",
    "CheckpointInfo",
    "inspect_checkpoint",
    "is_single_file",
    "load_single_file_pipeline",
]


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
V_PREDICTION_MARKER = "v_pred"
# The transformer keys diffusers' infer_diffusers_model_type recognizes the families by.
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
FLUX_GUIDANCE_MARKER = "guidance_in.in_layer.bias"
SD3_MARKER = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
SD35_LARGE_MARKER = "joint_blocks.37.x_block.mlp.fc1.weight"
SD35_MEDIUM_MARKER = "joint_blocks.0.x_block.attn2.qkv.weight"
# The diffusers folders diffusers itself takes a file's configuration from, per generation.
TRANSFORMER_REFERENCES = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35_large": "stabilityai/stable-diffusion-3.5-large",
}
TRANSFORMER_FAMILIES = ("flux", "sd3")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the keys of a single-file checkpoint say about it."""

    path: str
    family: str  # "sd" (1.x and 2.x), "sdxl", "flux" or "sd3"
    # "sd1", "sd2", "sdxl", "flux-dev", "flux-schnell", "sd3", "sd35_medium" or "sd35_large"
    generation: str
    v_prediction_marker: bool


def is_single_file(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` names a checkpoint file (by suffix) rather than a folder or hub id."""
    return str(model).lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)


def _keys(path: Path, allow_pickle: bool) -> list[str]:
    name = path.name
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{name} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors, or allow pickle checkpoints explicitly if you trust it"
            )
        import torch

        try:
            # weights_only: even an allowed pickle may only rebuild tensors and plain containers.
            data: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise ModelLoadError(f"{name} is not a readable checkpoint: {error}") from error
        while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise ModelLoadError(f"{name} is not a checkpoint (it holds no state dict)")
        return [str(key) for key in data]
    if path.suffix.lower() not in SAFE_SUFFIXES:
        raise ModelLoadError(
            f"{name} is not a checkpoint file; expected one of "
            f"{', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # the library raises its own error types for a bad header
        raise ModelLoadError(f"{name} is not a safetensors checkpoint: {error}") from error


def inspect_checkpoint(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> CheckpointInfo:
    """The family of a single-file checkpoint, read from its keys (a safetensors header only)."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    keys = _keys(file, allow_pickle)
    name = file.name
    transformer = _transformer_generation(keys)
    if transformer is not None:
        family = "flux" if transformer.startswith("flux") else "sd3"
        return CheckpointInfo(str(file), family, transformer, False)
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise ModelLoadError(
            f"{name} is not a Stable Diffusion, FLUX.1 or SD3 checkpoint: it has no UNet weights "
            f"({UNET_PREFIX}*) and no FLUX.1 or SD3 transformer weights"
        )
    if not any(key.startswith(VAE_PREFIX) for key in keys):
        raise ModelLoadError(f"{name} has no VAE weights ({VAE_PREFIX}*); MasaCtrl needs them")

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if all(has(prefix) for prefix in SDXL_TEXT_PREFIXES):
        family, generation = "sdxl", "sdxl"
    elif has(SDXL_REFINER_PREFIX):
        raise ModelLoadError(
            f"{name} is an SDXL refiner (no first text encoder); MasaCtrl needs a base checkpoint"
        )
    elif has(SD2_TEXT_PREFIX):
        family, generation = "sd", "sd2"
    elif has(SD1_TEXT_PREFIX):
        family, generation = "sd", "sd1"
    else:
        raise ModelLoadError(f"{name} has no text encoder weights of SD 1.x, 2.x or SDXL")
    return CheckpointInfo(str(file), family, generation, V_PREDICTION_MARKER in keys)


def _article(family: str) -> str:
    # Read aloud: "a flux", but "an S-D" for sd, sdxl and sd3.
    return "an" if family.startswith("s") else "a"


def _transformer_generation(keys: list[str]) -> str | None:
    """The FLUX.1 or SD3 generation of a file's transformer keys; None when it has none."""
    names = {key.removeprefix(UNET_PREFIX) for key in keys}
    if FLUX_MARKER in names:
        return "flux-dev" if FLUX_GUIDANCE_MARKER in names else "flux-schnell"
    if SD3_MARKER in names:
        if SD35_LARGE_MARKER in names:
            return "sd35_large"
        return "sd35_medium" if SD35_MEDIUM_MARKER in names else "sd3"
    return None


def _config_family(config: str) -> str | None:
    """The family a local diffusers config folder is for (None for a hub id: diffusers checks)."""
    index = Path(config) / "model_index.json"
    if not Path(config).is_dir():
        return None
    if not index.is_file():
        raise ModelLoadError(
            f"config folder {config} is not a diffusers folder (no model_index.json)"
        )
    from masactrl_core.backbones import detect_family

    return detect_family(json.loads(index.read_text(encoding="utf-8")))


def load_single_file_pipeline(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    config: str | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> tuple[DiffusionPipeline, CheckpointInfo]:
    """A diffusers pipeline from one checkpoint file; :class:`ModelLoadError` says what is wrong.

    ``family`` is the declared family (``sd``, ``sdxl``, ``flux`` or ``sd3``), checked against
    the file and the config folder; ``config`` is a local diffusers config folder or a hub id.
    """
    info = inspect_checkpoint(path, allow_pickle=allow_pickle)
    name = Path(path).name
    kind = f"{_article(info.family)} {info.family}"
    if family is not None and family != info.family:
        raise ModelLoadError(f"{name} is {kind} checkpoint, but it is declared {family}")
    if config is not None:
        config_family = _config_family(config)
        if config_family is not None and config_family != info.family:
            raise ModelLoadError(
                f"config folder {config} is for {config_family} models, but {name} is {info.family}"
            )
    # The family's backbone says which pipeline class loads it (masactrl_core.backbones).
    from masactrl_core.backbones import backbone_class

    backbone = backbone_class(info.family)
    if info.family in TRANSFORMER_FAMILIES:
        if prediction_type is not None:
            raise ModelLoadError(
                f"{name} is {kind} transformer, a flow-matching model: "
                "a prediction type applies only to SD and SDXL checkpoints"
            )
        return _load_transformer_file(Path(path), info, backbone, dtype, config), info
    loader: Any = backbone.pipeline_class()
    extra: dict[str, Any] = backbone.load_arguments()
    if config is not None:
        extra["config"] = config
        # A local folder needs nothing from the network; a hub id is read from the cache first.
        extra["local_files_only"] = Path(config).is_dir()
    try:
        pipeline = loader.from_single_file(str(path), dtype=dtype, **extra)
    except Exception as error:
        raise ModelLoadError(f"cannot load checkpoint {name}: {error}") from error
    declared = prediction_type or ("v_prediction" if info.v_prediction_marker else None)
    if declared is not None and declared != pipeline.scheduler.config.prediction_type:
        # A scheduler is a pipeline component: replacing it from its own config is public API.
        pipeline.scheduler = type(pipeline.scheduler).from_config(
            pipeline.scheduler.config, prediction_type=declared
        )
    return pipeline, info


def _load_transformer_file(
    path: Path, info: CheckpointInfo, backbone: Any, dtype: torch.dtype, config: str | None
) -> DiffusionPipeline:
    """The transformer from the file, the other components from ``config`` (or the reference)."""
    source = config if config is not None else TRANSFORMER_REFERENCES[info.generation]
    # A local folder needs nothing from the network; a hub id is read from the cache first.
    local = Path(source).is_dir()
    try:
        transformer = backbone.transformer_class().from_single_file(
            str(path),
            config=source,
            subfolder="transformer",
            dtype=dtype,
            local_files_only=local,
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load checkpoint {path.name}: {error}") from error
    try:
        pipeline: DiffusionPipeline = backbone.pipeline_class().from_pretrained(
            source,
            transformer=transformer,
            dtype=dtype,
            local_files_only=local,
            use_safetensors=True,
            **backbone.load_arguments(),
        )
    except Exception as error:
        raise ModelLoadError(
            f"cannot load the components of {path.name} other than its transformer "
            f"from {source}: {error}"
        ) from error
    return pipeline
