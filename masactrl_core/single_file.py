"""Single-file checkpoints: one ``.safetensors`` file in the original Stable Diffusion key layout.

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

The prediction type is, in order: the one declared by the caller; ``v_prediction`` when the file
carries the ``v_pred`` marker key that v-prediction community checkpoints add; else the config's.
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


@dataclass(frozen=True)
class CheckpointInfo:
    """What the keys of a single-file checkpoint say about it."""

    path: str
    family: str  # "sd" (1.x and 2.x) or "sdxl"
    generation: str  # "sd1", "sd2" or "sdxl"
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
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise ModelLoadError(
            f"{name} is not a Stable Diffusion checkpoint: it has no UNet weights ({UNET_PREFIX}*)"
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

    ``family`` is the declared family (``sd`` or ``sdxl``), checked against the file and the
    config folder; ``config`` is a local diffusers config folder or a hub id.
    """
    info = inspect_checkpoint(path, allow_pickle=allow_pickle)
    name = Path(path).name
    if family is not None and family != info.family:
        raise ModelLoadError(f"{name} is an {info.family} checkpoint, but it is declared {family}")
    if config is not None:
        config_family = _config_family(config)
        if config_family is not None and config_family != info.family:
            raise ModelLoadError(
                f"config folder {config} is for {config_family} models, but {name} is {info.family}"
            )
    # The family's backbone says which pipeline class loads it (masactrl_core.backbones).
    from masactrl_core.backbones import backbone_class

    backbone = backbone_class(info.family)
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
