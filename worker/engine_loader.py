"""Loading a catalog model into an engine, once per worker process, and warming it up.

Sources: a Hugging Face hub id, a local diffusers folder, one checkpoint file in the original
single-file layout (configured by the entry's ``config``), or ``s3://bucket/prefix`` (a folder or
one file, downloaded once to ``model_cache_dir/<name>/`` with the service's S3 endpoint and
credentials). Resolving the source needs no torch, so the CLI does it before the worker starts
and a bad source fails in seconds with one line, not inside a pool process.

Layout condition models (the catalog entry's ``conditions``) are loaded into the engine on first
use and kept warm by :class:`ConditionModels`: loading one takes seconds, a job uses it for many.
LoRA adapters (the entry's ``loras``) likewise, by :class:`CatalogLoras`: each is loaded into the
engine once, and a job activates the set it asks for (``engine.loras.activated``).
The live-preview decoder (the entry's ``preview_vae``, else the model's VAE) is loaded with the
model, once, by :func:`load_preview_decoder`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from masactrl_core.sources import locate_local
from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.schema import LoraInput
from masactrl_jobs.shape import FAMILY_GPU_DTYPE, ModelShape
from worker.config import WorkerSettings

if TYPE_CHECKING:
    from masactrl_core import MasaCtrlEngine
    from masactrl_core.conditions import ConditionModel
    from masactrl_core.previews import PreviewDecoder

__all__ = [
    "CatalogLoras",
    "ConditionModels",
    "ModelShapeMismatch",
    "load_engine",
    "measured_entry",
    "load_preview_decoder",
    "resolve_source",
    "warm_up",
    "weights_dtype",
]

logger = logging.getLogger(__name__)


def _s3_client(settings: WorkerSettings) -> Any:
    import boto3

    secret = settings.s3_secret_access_key
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        region_name=settings.s3_region,
    )


def resolve_source(entry: ModelEntry, settings: WorkerSettings) -> str:
    """A hub id, local folder or file for ``entry``, downloading an ``s3://`` source first.

    A local source that is missing (or a folder that is no model) raises ``ModelLoadError``
    here, before Celery starts; a hub id is checked by the engine as it loads.
    """
    source = entry.source
    if not source.startswith("s3://"):
        locate_local(source, f"model {entry.name}: source")
        return source
    parts = urlsplit(source)
    target = Path(settings.model_cache_dir).resolve() / entry.name
    if entry.single_file:
        file = target / Path(parts.path).name
        if not file.is_file():
            target.mkdir(parents=True, exist_ok=True)
            partial = file.with_name(file.name + ".partial")
            _s3_client(settings).download_file(parts.netloc, parts.path.lstrip("/"), str(partial))
            # Renamed last, so an interrupted download is never mistaken for the checkpoint.
            partial.rename(file)
        return str(file)
    if (target / "model_index.json").is_file():
        return str(target)
    client = _s3_client(settings)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted download
    started = time.monotonic()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :]
            if not relative or relative.endswith("/") or ".." in relative.split("/"):
                continue
            destination = partial.joinpath(*relative.split("/"))
            destination.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(destination))
            count += 1
    if not (partial / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} holds no model_index.json; is it a diffusers folder?")
    # Rename last, so an interrupted download is never mistaken for a complete model.
    partial.rename(target)
    logger.info("downloaded %d files of %s in %.1f s", count, source, time.monotonic() - started)
    return str(target)


def load_engine(entry: ModelEntry, settings: WorkerSettings, source: str) -> MasaCtrlEngine:
    """Load the model on the configured device and dtype."""
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging

    from masactrl_core import MasaCtrlEngine

    # Progress bars would land in the worker log as hundreds of lines per load.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    accelerator = settings.device is None or not settings.device.startswith("cpu")
    on_gpu = accelerator and (torch.cuda.is_available() or torch.backends.mps.is_available())
    name = weights_dtype(settings.dtype, entry.family, on_gpu=on_gpu)
    dtype = getattr(torch, name) if name else None
    started = time.monotonic()
    if entry.single_file:
        engine = MasaCtrlEngine.from_single_file(
            source,
            config=entry.config,
            family=entry.family,
            prediction_type=entry.prediction_type,
            allow_pickle=entry.allow_pickle,
            device=settings.device,
            dtype=dtype,
            offload=settings.offload,
        )
    else:
        engine = MasaCtrlEngine.from_pretrained(
            source,
            device=settings.device,
            dtype=dtype,
            allow_pickle=entry.allow_pickle,
            offload=settings.offload,
        )
    engine.model_name = entry.name
    logger.info(
        "model %s loaded from %s on %s (%s) in %.1f s",
        entry.name,
        source,
        engine.device,
        str(engine.dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return engine


def weights_dtype(configured: str | None, family: str, *, on_gpu: bool) -> str | None:
    """The dtype to load in: the configured one, else on a GPU the family's own where it has one
    (``masactrl_jobs.shape.FAMILY_GPU_DTYPE``: bfloat16 for FLUX.1), else the engine's default
    (None: float16 on GPUs, float32 on the CPU)."""
    if configured is not None or not on_gpu:
        return configured
    return FAMILY_GPU_DTYPE.get(family)


class ModelShapeMismatch(RuntimeError):
    """The catalog entry declares a shape that the loaded model contradicts."""


def measured_entry(entry: ModelEntry, engine: MasaCtrlEngine) -> ModelEntry:
    """``entry`` with the shape ``engine`` measures from the loaded model.

    A declared value the model contradicts (a block count, a size, a default start layer past
    its blocks) stops the worker with :class:`ModelShapeMismatch` naming both values: serving a
    model other than the one the catalog describes would fail its jobs one by one instead.
    """
    shape = ModelShape.from_description(engine.describe())
    conflicts = entry.shape_conflicts(shape)
    # What the gateway promises for the family (masactrl_jobs.shape.FAMILY_FEATURES) must be
    # what this engine's backbone runs: else jobs the gateway accepts would fail here.
    runs_conditions = bool(engine.backbone.supports_conditions)
    if entry.features.layout_conditions != runs_conditions:
        conflicts.append(
            f"the catalog says {entry.family} models "
            f"{'take' if entry.features.layout_conditions else 'take no'} layout conditions, but "
            f"the engine's {engine.family} backbone {'runs' if runs_conditions else 'runs none'}"
        )
    if conflicts:
        raise ModelShapeMismatch(
            "; ".join(conflicts)
            + ". Correct the catalog entry, or remove the declared values and let the model say."
        )
    return entry.with_shape(shape)


def load_preview_decoder(
    entry: ModelEntry, settings: WorkerSettings, engine: MasaCtrlEngine
) -> PreviewDecoder:
    """The decoder of live previews: the entry's ``preview_vae`` (an AutoencoderTiny, hub id or
    local folder) on the engine's device, else the model's own VAE."""
    from masactrl_core.previews import load_preview_decoder as load

    started = time.monotonic()
    decoder = load(engine, entry.preview_vae, max_side=settings.preview_max_side)
    if entry.preview_vae is not None:
        logger.info(
            "preview autoencoder of %s loaded from %s in %.1f s",
            entry.name,
            entry.preview_vae,
            time.monotonic() - started,
        )
    return decoder


def warm_up(engine: MasaCtrlEngine) -> float:
    """One tiny synthesis, so the first real job does not pay for kernel selection and caches."""
    side = engine.size_multiple
    started = time.monotonic()
    engine.synthesize("warm-up", ["warm-up"], seed=0, steps=1, width=side, height=side)
    seconds = time.monotonic() - started
    logger.info("warm-up run took %.2f s", seconds)
    return seconds


class ConditionModels:
    """The catalog entry's condition models, each loaded into ``engine`` on first use and kept."""

    def __init__(self, entry: ModelEntry, engine: MasaCtrlEngine) -> None:
        self.entry = entry
        self.engine = engine
        self._loaded: dict[str, ConditionModel] = {}
        # One load per name even if two threads ask at once; loads are rare, so one lock will do.
        self._lock = threading.Lock()

    def get(self, name: str) -> ConditionModel:
        """The loaded model called ``name``; ``UnknownCondition`` if the entry lacks it."""
        condition = self.entry.condition(name)
        with self._lock:
            if name not in self._loaded:
                started = time.monotonic()
                self._loaded[name] = self.engine.load_condition_model(condition.source)
                logger.info(
                    "condition model %s (%s) of %s loaded from %s in %.1f s",
                    name,
                    condition.kind,
                    self.entry.name,
                    condition.source,
                    time.monotonic() - started,
                )
            return self._loaded[name]


class CatalogLoras:
    """The catalog entry's LoRA adapters, each loaded into ``engine`` on first use and kept."""

    def __init__(self, entry: ModelEntry, engine: MasaCtrlEngine) -> None:
        self.entry = entry
        self.engine = engine

    def weights(self, loras: list[LoraInput]) -> dict[str, float]:
        """The job's adapters by name with their weights, loading any not loaded yet.

        ``UnknownLora`` for a name the entry lacks; ``ModelLoadError`` when one cannot load.
        """
        for lora in loras:
            adapter = self.entry.lora(lora.name)
            if lora.name not in self.engine.loras.names:
                started = time.monotonic()
                self.engine.loras.load(lora.name, adapter.source, allow_pickle=adapter.allow_pickle)
                logger.info(
                    "LoRA %s of %s loaded from %s in %.1f s",
                    lora.name,
                    self.entry.name,
                    adapter.source,
                    time.monotonic() - started,
                )
        return {lora.name: lora.weight for lora in loras}
