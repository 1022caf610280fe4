"""What a job kind's run gets on a GPU worker: one :class:`JobContext` per run.

A kind (``masactrl_jobs.kinds``) says which inputs its job loads, which engine call it makes and
which results it stores; it is torch-free, so it reaches the engine and the worker's machinery
through the ``RunContext`` protocol, which :class:`JobContext` implements:

- the job's stored inputs, read with retries and decoded (a missing or damaged one fails the job
  with ``invalid_input``, never a traceback);
- the options every engine call shares: seed, size, the control (checked against this worker's
  model: the gateway checked it against its catalog), progress (throttled store writes and
  webhooks), cancel polling (the store's flag, or a lost lease) and live previews;
- masks, layout conditions (models loaded once per worker, canny applied) and the inversion
  cache.

The runner (``worker.runner``) owns the rest of the run: the protocol, LoRA activation, the
previews' lifetime, metrics, storing the results and the job's end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from masactrl_core import ControlConfig, InvertedImage, MaskConfig
from masactrl_core.previews import LatentsCallback, PreviewDecoder, Previews
from masactrl_jobs.catalog import UnknownCondition
from masactrl_jobs.control import InvalidParameters, check_control
from masactrl_jobs.kinds.base import Engine
from masactrl_jobs.media import MediaError, OverBudget, VideoBudget, open_image
from masactrl_jobs.schema import (
    ConditionInput,
    ErrorCode,
    ImageRole,
    JobInput,
    MaskMode,
    Preprocess,
)
from masactrl_jobs.storage import ObjectNotFound
from masactrl_jobs.store import JobRecord
from worker.inversion_cache import inversion_cache_key
from worker.leases import JobLease
from worker.previews import PreviewPublisher

if TYPE_CHECKING:
    from worker.runner import JobRunner

__all__ = ["Failure", "JobContext"]

logger = logging.getLogger(__name__)


class Failure(Exception):
    """A job failure with its code and user-facing message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode(data: bytes, what: str, max_side: int, mode: str = "RGB") -> Image.Image:
    """Decode stored bytes fully, their size checked first; a damaged or oversized object is the
    job's input error, not a crash (the gateway checked it, but storage is not the gateway)."""
    try:
        return open_image(data, what=what, mode=mode, max_side=max_side)
    except OverBudget as exc:
        raise Failure(ErrorCode.invalid_input, str(exc)) from None
    except MediaError as exc:
        raise Failure(ErrorCode.invalid_input, f"the {what} cannot be decoded: {exc}") from None


@dataclass
class _Inversion:
    """The inversion cache's slot for one photo (``masactrl_jobs.kinds.base.Inversion``)."""

    runner: JobRunner
    job_id: str
    key: str | None
    inverted: InvertedImage | None

    def keep(self, fresh: Any) -> None:
        """Save a fresh inversion to the cache (or log that the cached one served)."""
        if self.inverted is not None:
            logger.info("job %s: reused the cached inversion %s", self.job_id, self.key)
        elif self.runner.cache is not None and self.key and fresh is not None:
            self.runner.cache.save(self.key, fresh.to_safetensors_bytes())


class JobContext:
    """One run of one job: what its kind reads and calls, and its progress, cancel and previews.

    ``preview_role`` names the previews' images after the source (the kind's ``preview_role``).
    """

    def __init__(
        self, runner: JobRunner, record: JobRecord, lease: JobLease, preview_role: ImageRole
    ) -> None:
        self.runner = runner
        self.record = record
        self.lease = lease
        self.preview_role = preview_role
        self.cancel_seen = False
        self.last_write = float("-inf")
        self.last_webhook = float("-inf")
        self.last_progress: tuple[str, int, int] | None = None
        # Sequences: frames decoded so far, reported with the progress.
        self.frames: int | None = None
        # Jobs with previews: where this run's previews go.
        self.previews: PreviewPublisher | None = None

    # -- the job and the engine

    @property
    def input(self) -> JobInput:
        return self.record.input

    @property
    def engine(self) -> Engine:
        return self.runner.engine

    @property
    def max_sequence_frames(self) -> int:
        return self.runner.engine.options.max_sequence_frames

    @property
    def video_budget(self) -> VideoBudget:
        return VideoBudget.from_settings(self.runner.settings, self.max_sequence_frames)

    # -- stored inputs

    def read(self, key: str, what: str) -> bytes:
        try:
            return self.runner.retry(self.runner.storage.get, key)
        except ObjectNotFound:
            raise Failure(
                ErrorCode.invalid_input, f"the {what} {key} is no longer in storage"
            ) from None

    def decode(self, data: bytes, what: str, mode: str = "RGB") -> Image.Image:
        return decode(data, what, self.runner.settings.max_image_side, mode)

    def preprocess(self, image: Image.Image, preprocess: Preprocess) -> Image.Image:
        if preprocess == "canny":
            from masactrl_core.canny import canny

            return canny(image)
        return image

    # -- what every engine call shares

    def engine_options(self) -> dict[str, Any]:
        params = self.input
        return {
            "seed": params.seed,
            "steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "control": self._control(),
            "progress": self._on_progress,
            "should_cancel": self.should_cancel,
            "on_latents": self._previews(),
        }

    def _control(self) -> ControlConfig:
        try:
            # The gateway resolved the control against the shape it knew; this worker's model
            # (its entry carries the shape measured at start-up) decides.
            control = check_control(self.runner.entry, self.input.control, self.input.steps)
        except InvalidParameters as exc:
            raise Failure(ErrorCode.invalid_input, str(exc)) from None
        return ControlConfig(
            start_step=control.start_step,
            start_layer=control.start_layer,
            layers=control.layers,
            steps=control.steps,
        )

    def _previews(self) -> LatentsCallback | None:
        """The engine's x̂₀ callback of a job that asked for previews (None otherwise)."""
        if not self.input.previews:
            return None
        runner = self.runner
        self.previews = PreviewPublisher(
            runner.store, runner.storage, self.record.id, target_role=self.preview_role
        )
        settings = runner.settings
        decoder = runner.preview_decoder
        if decoder is None:
            # Kept by the runner for its later jobs (worker.engine_loader loads a small one).
            decoder = runner.preview_decoder = PreviewDecoder(
                runner.engine.vae, tiny=False, max_side=settings.preview_max_side
            )
        every = settings.preview_every_steps if decoder.tiny else settings.preview_vae_every_steps
        return Previews(
            decoder,
            self.previews,
            every=every,
            min_interval=settings.preview_min_interval_seconds,
        )

    # -- masks, conditions, the inversion cache

    def masks(self) -> MaskConfig | None:
        mask = self.input.control.mask
        if mask.mode is MaskMode.none:
            return None
        if mask.mode is MaskMode.auto:
            return MaskConfig(
                source_word=mask.source_word,
                target_word=mask.target_word,
                threshold=mask.threshold,
            )
        regions = [
            (
                self.decode(self.read(region.source, "source mask"), "source mask", "L"),
                self.decode(self.read(region.target, "target mask"), "target mask", "L"),
            )
            for region in mask.regions or []
        ]
        return MaskConfig(regions=regions)

    def condition_model(self, name: str) -> Any:
        from masactrl_core import ModelLoadError

        try:
            return self.runner.conditions.get(name)
        except UnknownCondition as exc:
            # The gateway's catalog listed it; this worker's does not.
            raise Failure(ErrorCode.invalid_input, str(exc)) from None
        except ModelLoadError as exc:
            raise Failure(ErrorCode.internal_error, f"condition model {name}: {exc}") from exc

    def condition(
        self,
        model: Any,
        images: Sequence[Image.Image],
        requested: ConditionInput,
        source_image: Image.Image | None = None,
    ) -> Any:
        from masactrl_core.conditions import Condition

        return Condition(
            model,
            list(images),
            source_image=source_image,
            scale=requested.scale,
            start=requested.start,
            end=requested.end,
        )

    def inversion(self, image_sha256: str) -> _Inversion:
        runner = self.runner
        params = self.input
        if runner.cache is None:
            return _Inversion(runner, self.record.id, None, None)
        key = inversion_cache_key(
            image_sha256,
            runner.entry.name,
            params.width,
            params.height,
            params.steps,
            params.source_prompt,
            [
                (lora.name, runner.entry.lora(lora.name).source, lora.weight)
                for lora in params.loras
            ],
        )
        inverted = None
        cached = runner.cache.load(key)
        if cached is not None:
            try:
                inverted = InvertedImage.from_safetensors_bytes(cached)
            except Exception as exc:
                logger.warning("ignoring unreadable cached inversion %s: %s", key, exc)
        if inverted is not None and params.anchor_source and not inverted.has_trajectory:
            # An entry written before trajectories were kept: invert again (and replace it).
            inverted = None
        return _Inversion(runner, self.record.id, key, inverted)

    # -- progress and cancel

    def frames_done(self, count: int) -> None:
        self.frames = count
        self.progress_now()

    def _on_progress(self, phase: str, step: int, total: int) -> None:
        runner = self.runner
        settings = runner.settings
        if settings.step_delay_seconds:
            runner.sleep(settings.step_delay_seconds)
        self.last_progress = (phase, step, total)
        now = time.monotonic()
        if now - self.last_write >= settings.progress_interval_seconds or step == total:
            self.last_write = now
            self.progress_now()
        interval = settings.webhook_progress_interval_seconds
        if now - self.last_webhook >= interval and self.record.webhook:
            self.last_webhook = now
            try:
                fresh = runner.store.get(self.record.id)
            except Exception:
                fresh = None
            if fresh is not None:
                runner.emitter.emit(
                    fresh, "job.progress", suffix=f"{phase}_{step}_{fresh.attempts}"
                )

    def progress_now(self) -> None:
        """Write the latest progress (and learn whether a cancel was asked for)."""
        if self.last_progress is None:
            return
        phase, step, total = self.last_progress
        job_id = self.record.id
        try:
            result = self.runner.store.progress(job_id, phase, step, total, self.frames)
        except Exception as exc:
            # Progress is informational: a Redis blip must not stop the run.
            logger.warning("progress update of job %s failed: %s", job_id, exc)
            return
        self.cancel_seen = self.cancel_seen or result.cancel_requested

    def should_cancel(self) -> bool:
        """Whether the run should stop: a cancel was asked for, or this worker lost the lease."""
        if self.lease.lost or self.cancel_seen:
            return True
        try:
            self.cancel_seen = self.runner.store.cancel_requested(self.record.id)
        except Exception as exc:
            logger.warning("cancel check of job %s failed: %s", self.record.id, exc)
        return self.cancel_seen
