"""Running one job on a loaded engine: the exactly-once protocol, progress, cancel and errors.

``JobRunner.run(job_id)`` is what ``masactrl.run_job`` does in a GPU worker. Messages arrive at
least once (late acks, broker redelivery, the janitor); the job's effect happens once:

0. note that this worker took the message (``take``): if it dies before step 3, the janitor
   requeues the job within a lease lifetime instead of the broker's hour;
1. a job that is missing or already terminal: acknowledge and drop (a queued job cancelled before
   pickup ends here, without reading its inputs, and its ``job.canceled`` webhook goes out here);
2. take the job's lease (``SET NX`` with a TTL); when another worker holds it, that worker is alive
   and running the job: drop;
3. mark it running (``attempts`` + 1: this run's fencing token) and renew the lease in the
   background;
4. read the input, run the engine, write ``results/<job_id>/<role>_<k>.png`` (a rerun overwrites
   the same keys), then mark the job ``succeeded``; a worker that lost its lease writes nothing.
   A job with ``previews`` publishes small previews while it runs (``worker.previews``), under
   ``results/<job_id>/previews/``; they are deleted once it succeeded, with its results otherwise.

Every end of the job (succeeded, failed, canceled) is fenced by the attempt number inside the
store's script: a worker that stalled past its lease while another started the job can no longer
end it. Partial results are deleted only after this attempt's own failure or cancellation was
recorded, so a losing attempt never deletes the winner's images.

Redis calls are retried for a lease lifetime, so a Redis restart does not fail the run; the lease
renewal rides through it too (``worker.leases``).

Every failure ends as a job status with a code, never as a traceback in the job.
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image, UnidentifiedImageError

from masactrl_core import (
    ControlConfig,
    InvalidInput,
    InvertedImage,
    JobCancelled,
    MasaCtrlEngine,
    MaskConfig,
)
from masactrl_core.previews import LatentsCallback, PreviewDecoder, Previews
from masactrl_jobs.catalog import ModelEntry, UnknownCondition, UnknownLora
from masactrl_jobs.control import InvalidParameters, check_control, condition_problems
from masactrl_jobs.media import MediaError, decode_video, encode_mp4, encode_webp
from masactrl_jobs.queue import enqueue_job
from masactrl_jobs.schema import ErrorCode, ImageRole, JobKind, JobStatus, MaskMode
from masactrl_jobs.storage import (
    ObjectNotFound,
    Storage,
    StorageError,
    animation_key,
    content_type_for,
    result_key,
    results_prefix,
)
from masactrl_jobs.store import FinishResult, JobRecord, JobStore
from worker.config import WorkerSettings
from worker.engine_loader import CatalogLoras, ConditionModels
from worker.inversion_cache import InversionCache, inversion_cache_key
from worker.leases import JobLease
from worker.outputs import png_bytes
from worker.previews import PreviewPublisher
from worker.retry import Retrier
from worker.webhooks import Emitter

__all__ = ["JobRunner"]

logger = logging.getLogger(__name__)

# The animations' frame rate when a job does not say (jobs made by the gateway always do).
DEFAULT_ANIMATION_FPS = 8.0


class _Failure(Exception):
    """A job failure with its code and user-facing message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Abandon(Exception):
    """This worker lost the job's lease: another one runs it now, so write nothing."""


@dataclass
class _RunState:
    """Progress throttling and cancel polling for one run."""

    job_id: str
    lease: JobLease
    cancel_seen: bool = False
    last_write: float = float("-inf")
    last_webhook: float = float("-inf")
    last_progress: tuple[str, int, int] | None = None
    # The condition images as the engine received them (after canny), published with the results.
    condition_images: list[tuple[str, Image.Image]] = field(default_factory=list)
    # Sequences: frames decoded so far, reported with the progress.
    frames_done: int | None = None
    # Jobs with previews: where this run's previews go.
    previews: PreviewPublisher | None = None


def _decode(data: bytes, what: str, mode: str = "RGB") -> Image.Image:
    """Decode stored bytes fully; a damaged object is the job's input error, not a crash."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _Failure(ErrorCode.invalid_input, f"the {what} cannot be decoded: {exc}") from None


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release_gpu_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobRunner:
    """Runs jobs for one model on one loaded engine."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        entry: ModelEntry,
        engine: MasaCtrlEngine,
        store: JobStore,
        storage: Storage,
        app: Celery,
        emitter: Emitter,
        worker_id: str,
        cache: InversionCache | None = None,
        conditions: ConditionModels | None = None,
        preview_decoder: PreviewDecoder | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.entry = entry
        self.engine = engine
        self.store = store
        self.storage = storage
        self.app = app
        self.emitter = emitter
        self.worker_id = worker_id
        self.cache = cache
        self.conditions = conditions or ConditionModels(entry, engine)
        self.loras = CatalogLoras(entry, engine)
        # Loaded once per worker (worker.engine_loader); without one, the model's VAE decodes.
        self.preview_decoder = preview_decoder
        self._sleep = sleep
        self.retry = Retrier(
            settings.storage_retry_attempts, settings.storage_retry_max_wait_seconds
        )
        # Store writes wait out a Redis restart for a lease lifetime: past that, another worker
        # may run the job, and the fence decides.
        self.store_retry = Retrier(max_wait=1.0, for_seconds=settings.lease_ttl)

    # -- the protocol ----------------------------------------------------------------------

    def run(self, job_id: str) -> str:
        """Run (or drop) the job; returns what happened, for logs and tests."""
        self.store_retry(self.store.take, job_id)
        outcome = self._run_taken(job_id)
        if outcome in ("missing", "dropped", "rerouted", "canceled"):
            # Nothing left for the janitor to recover (a started job left the note behind).
            self._quietly(self.store.untake, job_id)
        return outcome

    def _run_taken(self, job_id: str) -> str:
        record = self.store_retry(self.store.get, job_id)
        if record is None:
            logger.info("job %s does not exist (expired?); dropping the message", job_id)
            return "missing"
        if record.status.is_terminal():
            self._announce_queued_cancel(record.status, job_id)
            logger.info("job %s is already %s; dropping the message", job_id, record.status.value)
            return "dropped"
        if record.model != self.entry.name:
            logger.warning(
                "job %s is for model %s, not %s; rerouting", job_id, record.model, self.entry.name
            )
            enqueue_job(self.app, job_id, record.model)
            return "rerouted"

        lease = JobLease(
            self.store,
            job_id,
            self.worker_id,
            self.settings.lease_ttl,
            self.settings.lease_renew_interval,
        )
        if not self.store_retry(lease.acquire):
            logger.info("job %s is running on another live worker; dropping the message", job_id)
            return "leased"
        try:
            started = self.store_retry(self.store.start, job_id, self.worker_id)
            if started.outcome == "missing":
                return "missing"
            if started.outcome == "terminal":
                # Cancelled between the read above and the start: still announce it.
                if started.status:
                    self._announce_queued_cancel(JobStatus(started.status), job_id)
                return "dropped"
            if started.outcome == "cancel_requested":
                self.store_retry(self.store.finish_canceled, job_id)
                self.emitter.emit_terminal(job_id)
                return "canceled"
            attempt = started.attempts
            lease.start_heartbeat(attempt)
            record = self.store_retry(self.store.get, job_id) or record
            if attempt > self.settings.max_attempts:
                return self._fail(
                    job_id,
                    attempt,
                    _Failure(
                        ErrorCode.worker_lost,
                        f"the job's worker stopped {attempt - 1} times while running "
                        "it; it is not tried again",
                    ),
                    {},
                )
            logger.info("job %s: attempt %d on %s", job_id, attempt, self.worker_id)
            self.emitter.emit(record, "job.started", suffix=str(attempt))
            return self._execute(record, attempt, lease)
        finally:
            lease.release()

    def _announce_queued_cancel(self, status: JobStatus, job_id: str) -> None:
        # A job cancelled while queued ends in the gateway, which sends no webhooks; the message
        # that reaches a worker announces it. Repeats share one webhook id, so receivers see one.
        if status is JobStatus.canceled:
            self.emitter.emit_terminal(job_id)

    def _quietly(self, fn: Callable[[str], object], job_id: str) -> None:
        try:
            fn(job_id)
        except Exception as exc:
            logger.warning("%s of job %s failed: %s", fn.__name__, job_id, exc)

    def _execute(self, record: JobRecord, attempt: int, lease: JobLease) -> str:
        job_id = record.id
        state = _RunState(job_id, lease)
        metrics: dict[str, Any] = {}
        try:
            try:
                image, image_sha = self._load_input(record)
                # Only this job's adapters are active while it runs, and none after it (even on
                # errors), so a job without adapters runs on the plain model as it is.
                adapters = self._adapters(record)
                active: AbstractContextManager[None] = (
                    self.engine.loras.activated(adapters) if adapters else nullcontext()
                )
                try:
                    with active:
                        result, engine_seconds = self._run_engine(record, image, image_sha, state)
                finally:
                    # No preview may land after the results or the end of the job.
                    if state.previews is not None:
                        state.previews.close()
                metrics = self._metrics(record, result.stats, engine_seconds)
                if lease.lost:
                    raise _Abandon
                images = self._write_outputs(record, result, state.condition_images)
                metrics["total_seconds"] = round(max(0.0, time.time() - record.created_at), 3)
            except JobCancelled:
                if lease.lost:
                    raise _Abandon from None
                raise
            except SoftTimeLimitExceeded:
                raise _Failure(
                    ErrorCode.timeout,
                    f"the job ran longer than {self.settings.soft_time_limit_seconds:g} s; "
                    "try fewer steps, fewer targets or a smaller size",
                ) from None
            except (InvalidInput, _Failure):
                raise
            except StorageError as exc:
                raise _Failure(
                    ErrorCode.storage_unavailable, f"storage failed while running the job: {exc}"
                ) from exc
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # cannot record anything in Redis; the lease lapses and the job reruns
            except Exception as exc:
                if _is_out_of_memory(exc):
                    _release_gpu_memory()
                    raise _Failure(
                        ErrorCode.out_of_memory,
                        f"the GPU ran out of memory at {record.input.width}x{record.input.height} "
                        f"with {len(record.input.target_prompts)} target prompt(s); try a smaller "
                        "width/height or fewer target prompts",
                    ) from exc
                raise
        except _Abandon:
            logger.warning("job %s: lease lost, leaving the job to its new worker", job_id)
            return "abandoned"
        except JobCancelled:
            self._progress_now(state)
            canceled = self.store_retry(
                self.store.finish_canceled, job_id, metrics or None, attempt=attempt
            )
            if not canceled.ok:
                return self._superseded(job_id, attempt, canceled)
            self._delete_results(job_id)
            self.emitter.emit_terminal(job_id)
            logger.info("job %s canceled", job_id)
            return "canceled"
        except InvalidInput as exc:
            return self._fail(job_id, attempt, _Failure(ErrorCode.invalid_input, str(exc)), metrics)
        except _Failure as failure:
            return self._fail(job_id, attempt, failure, metrics)
        except (redis.ConnectionError, redis.TimeoutError):
            logger.exception("job %s: Redis unreachable; the job will be rerun", job_id)
            raise
        except Exception:
            logger.exception("job %s failed unexpectedly", job_id)
            return self._fail(
                job_id,
                attempt,
                _Failure(ErrorCode.internal_error, "the worker hit an unexpected error (logged)"),
                metrics,
            )
        finish = self.store_retry(self.store.succeed, job_id, images, metrics, attempt=attempt)
        if not finish.ok:
            return self._superseded(job_id, attempt, finish)
        if state.previews is not None:
            state.previews.remove()  # the results replace them
        self.emitter.emit_terminal(job_id)
        logger.info(
            "job %s succeeded in %.2f s (engine %.2f s)",
            job_id,
            metrics.get("total_seconds", 0.0),
            metrics.get("engine_seconds", 0.0),
        )
        return "succeeded"

    def _superseded(self, job_id: str, attempt: int, finish: FinishResult) -> str:
        logger.warning(
            "job %s: attempt %d may not end the job (%s, now %s); leaving it as it is",
            job_id,
            attempt,
            finish.outcome,
            finish.previous,
        )
        return "conflict"

    def _fail(self, job_id: str, attempt: int, failure: _Failure, metrics: dict[str, Any]) -> str:
        logger.warning("job %s failed: %s: %s", job_id, failure.code.value, failure.message)
        failed = self.store_retry(
            self.store.fail,
            job_id,
            failure.code.value,
            failure.message,
            metrics or None,
            attempt=attempt,
        )
        if not failed.ok:
            return self._superseded(job_id, attempt, failed)
        self._delete_results(job_id)
        self.emitter.emit_terminal(job_id)
        return "failed"

    def _delete_results(self, job_id: str) -> None:
        # Called once this attempt's failure or cancellation is recorded (so no other attempt can
        # succeed any more): an earlier attempt may have written images; the job has none.
        try:
            self.retry(self.storage.delete_prefix, results_prefix(job_id))
        except Exception as exc:
            logger.warning("could not delete partial results of job %s: %s", job_id, exc)

    # -- pieces ----------------------------------------------------------------------------

    def _load_input(self, record: JobRecord) -> tuple[Image.Image | None, str | None]:
        # A sequence's source is a photo when it names one, else synthesized like a synthesis.
        if record.kind is JobKind.synthesis or (
            record.kind is JobKind.sequence and not record.input.image
        ):
            return None, None
        key = record.input.image
        if not key:
            raise _Failure(ErrorCode.invalid_input, "the edit has no input image")
        data = self._read(key, "input image")
        return _decode(data, "input image"), hashlib.sha256(data).hexdigest()

    def _read(self, key: str, what: str) -> bytes:
        try:
            return self.retry(self.storage.get, key)
        except ObjectNotFound:
            raise _Failure(
                ErrorCode.invalid_input, f"the {what} {key} is no longer in storage"
            ) from None

    def _masks(self, record: JobRecord) -> MaskConfig | None:
        mask = record.input.control.mask
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
                _decode(self._read(region.source, "source mask"), "source mask", "L"),
                _decode(self._read(region.target, "target mask"), "target mask", "L"),
            )
            for region in mask.regions or []
        ]
        return MaskConfig(regions=regions)

    def _control(self, record: JobRecord) -> ControlConfig:
        try:
            # The gateway resolved the control against the shape it knew; this worker's model
            # (its entry carries the shape measured at start-up) decides.
            control = check_control(self.entry, record.input.control, record.input.steps)
        except InvalidParameters as exc:
            raise _Failure(ErrorCode.invalid_input, str(exc)) from None
        return ControlConfig(
            start_step=control.start_step,
            start_layer=control.start_layer,
            layers=control.layers,
            steps=control.steps,
        )

    def _condition(self, record: JobRecord, state: _RunState) -> Any:
        """The engine's ``Condition`` for the job (model kept warm, canny applied), or None."""
        requested = record.input.condition
        if requested is None:
            return None
        from masactrl_core import ModelLoadError
        from masactrl_core.conditions import Condition

        problems = condition_problems(
            targets=len(record.input.target_prompts),
            images=len(requested.images),
            has_source_image=requested.source_image is not None,
            editing=record.kind is JobKind.edit,
            scale=requested.scale,
            start=requested.start,
            end=requested.end,
            preprocess=requested.preprocess,
        )
        if problems:
            raise _Failure(ErrorCode.invalid_input, str(InvalidParameters(problems)))
        try:
            model = self.conditions.get(requested.model)
        except UnknownCondition as exc:
            # The gateway's catalog listed it; this worker's does not.
            raise _Failure(ErrorCode.invalid_input, str(exc)) from None
        except ModelLoadError as exc:
            raise _Failure(
                ErrorCode.internal_error, f"condition model {requested.model}: {exc}"
            ) from exc

        def read(key: str, what: str) -> Image.Image:
            image = _decode(self._read(key, what), what)
            if requested.preprocess == "canny":
                from masactrl_core.canny import canny

                return canny(image)
            return image

        images = [read(key, f"condition image {k}") for k, key in enumerate(requested.images)]
        source = (
            None
            if requested.source_image is None
            else read(requested.source_image, "source condition image")
        )
        # Labelled with the prompt each one lays out; one shared image serves every target.
        prompts = record.input.target_prompts if len(images) > 1 else ["(every target prompt)"]
        state.condition_images = [
            *([(record.input.source_prompt, source)] if source is not None else []),
            *zip(prompts, images, strict=True),
        ]
        return Condition(
            model,
            images,
            source_image=source,
            scale=requested.scale,
            start=requested.start,
            end=requested.end,
        )

    def _run_engine(
        self,
        record: JobRecord,
        image: Image.Image | None,
        image_sha: str | None,
        state: _RunState,
    ) -> tuple[Any, float]:
        if record.kind is JobKind.sequence:
            return self._run_sequence(record, image, image_sha, state)
        params = record.input
        common: dict[str, Any] = {
            "seed": params.seed,
            "steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "control": self._control(record),
            "progress": lambda phase, step, total: self._on_progress(
                record, state, phase, step, total
            ),
            "should_cancel": lambda: self._should_cancel(state),
            "masks": self._masks(record),
            "condition": self._condition(record, state),
            "on_latents": self._previews(record, state),
        }
        started = time.perf_counter()
        if record.kind is JobKind.synthesis:
            result = self.engine.synthesize(params.source_prompt, params.target_prompts, **common)
            return result, time.perf_counter() - started

        assert image is not None and image_sha is not None
        cache_key, inverted = self._cached_inversion(record, image_sha)
        started = time.perf_counter()
        result = self.engine.edit(
            image,
            params.target_prompts,
            source_prompt=params.source_prompt,
            inverted=inverted,
            anchor_source=params.anchor_source,
            **common,
        )
        engine_seconds = time.perf_counter() - started
        self._keep_inversion(record, cache_key, inverted, result.inverted)
        return result, engine_seconds

    def _adapters(self, record: JobRecord) -> dict[str, float]:
        """The job's LoRA adapters with their weights, loaded on first use."""
        from masactrl_core import ModelLoadError

        try:
            return self.loras.weights(record.input.loras)
        except UnknownLora as exc:
            raise _Failure(ErrorCode.invalid_input, str(exc)) from None
        except ModelLoadError as exc:
            raise _Failure(ErrorCode.internal_error, str(exc)) from exc

    def _cached_inversion(
        self, record: JobRecord, image_sha: str
    ) -> tuple[str | None, InvertedImage | None]:
        """The inversion cache's key for this job's image and its entry (None when absent)."""
        params = record.input
        cache_key = None
        inverted = None
        if self.cache is not None:
            cache_key = inversion_cache_key(
                image_sha,
                self.entry.name,
                params.width,
                params.height,
                params.steps,
                params.source_prompt,
                [
                    (lora.name, self.entry.lora(lora.name).source, lora.weight)
                    for lora in params.loras
                ],
            )
            cached = self.cache.load(cache_key)
            if cached is not None:
                try:
                    inverted = InvertedImage.from_safetensors_bytes(cached)
                except Exception as exc:
                    logger.warning("ignoring unreadable cached inversion %s: %s", cache_key, exc)
            if inverted is not None and params.anchor_source and not inverted.has_trajectory:
                # An entry written before trajectories were kept: invert again (and replace it).
                inverted = None
        return cache_key, inverted

    def _keep_inversion(
        self,
        record: JobRecord,
        cache_key: str | None,
        cached: InvertedImage | None,
        fresh: InvertedImage | None,
    ) -> None:
        """Save a fresh inversion to the cache (or log that the cached one served)."""
        if cached is not None:
            logger.info("job %s: reused the cached inversion %s", record.id, cache_key)
        elif self.cache is not None and cache_key and fresh is not None:
            self.cache.save(cache_key, fresh.to_safetensors_bytes())

    def _sequence_condition(self, record: JobRecord) -> Any:
        """The engine's ``Condition`` holding the sequence's frames (a video decoded here)."""
        from masactrl_core import ModelLoadError
        from masactrl_core.conditions import Condition

        requested = record.input.condition
        if requested is None:
            raise _Failure(ErrorCode.invalid_input, "the sequence has no condition frames")
        try:
            model = self.conditions.get(requested.model)
        except UnknownCondition as exc:
            raise _Failure(ErrorCode.invalid_input, str(exc)) from None
        except ModelLoadError as exc:
            raise _Failure(
                ErrorCode.internal_error, f"condition model {requested.model}: {exc}"
            ) from exc
        if requested.video is not None:
            # One past the engine's limit at most, so a long video is refused, not decoded whole.
            most = requested.max_frames or self.engine.options.max_sequence_frames + 1
            data = self._read(requested.video, "video")
            try:
                frames = decode_video(data, fps=requested.fps, max_frames=most)
            except MediaError as exc:
                raise _Failure(ErrorCode.invalid_input, str(exc)) from None
        else:
            frames = [
                _decode(self._read(key, f"condition frame {k}"), f"condition frame {k}")
                for k, key in enumerate(requested.images)
            ]
        if requested.preprocess == "canny":
            from masactrl_core.canny import canny

            frames = [canny(frame) for frame in frames]
        return Condition(
            model, frames, scale=requested.scale, start=requested.start, end=requested.end
        )

    def _run_sequence(
        self,
        record: JobRecord,
        image: Image.Image | None,
        image_sha: str | None,
        state: _RunState,
    ) -> tuple[Any, float]:
        params = record.input
        condition = self._sequence_condition(record)
        cache_key, inverted = (
            self._cached_inversion(record, image_sha) if image_sha is not None else (None, None)
        )
        state.frames_done = 0

        def frame_done(index: int, frame: Image.Image) -> None:
            state.frames_done = index + 1
            self._progress_now(state)

        started = time.perf_counter()
        result = self.engine.sequence(
            params.source_prompt,
            params.target_prompts,
            condition,
            image=image,
            inverted=inverted,
            anchor_source=params.anchor_source,
            seed=params.seed,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            negative_prompt=params.negative_prompt,
            width=params.width,
            height=params.height,
            control=self._control(record),
            progress=lambda phase, step, total: self._on_progress(
                record, state, phase, step, total
            ),
            should_cancel=lambda: self._should_cancel(state),
            on_frame=frame_done,
            on_latents=self._previews(record, state),
        )
        engine_seconds = time.perf_counter() - started
        self._keep_inversion(record, cache_key, inverted, result.inverted)
        return result, engine_seconds

    def _previews(self, record: JobRecord, state: _RunState) -> LatentsCallback | None:
        """The engine's x̂₀ callback of a job that asked for previews (None otherwise)."""
        if not record.input.previews:
            return None
        role = ImageRole.frame if record.kind is JobKind.sequence else ImageRole.target
        state.previews = PreviewPublisher(self.store, self.storage, record.id, target_role=role)
        settings = self.settings
        if self.preview_decoder is None:
            self.preview_decoder = PreviewDecoder(
                self.engine.vae, tiny=False, max_side=settings.preview_max_side
            )
        decoder = self.preview_decoder
        every = settings.preview_every_steps if decoder.tiny else settings.preview_vae_every_steps
        return Previews(
            decoder,
            state.previews,
            every=every,
            min_interval=settings.preview_min_interval_seconds,
        )

    def _on_progress(
        self, record: JobRecord, state: _RunState, phase: str, step: int, total: int
    ) -> None:
        if self.settings.step_delay_seconds:
            self._sleep(self.settings.step_delay_seconds)
        state.last_progress = (phase, step, total)
        now = time.monotonic()
        if now - state.last_write >= self.settings.progress_interval_seconds or step == total:
            state.last_write = now
            self._progress_now(state)
        interval = self.settings.webhook_progress_interval_seconds
        if now - state.last_webhook >= interval and record.webhook:
            state.last_webhook = now
            try:
                fresh = self.store.get(record.id)
            except Exception:
                fresh = None
            if fresh is not None:
                self.emitter.emit(fresh, "job.progress", suffix=f"{phase}_{step}_{fresh.attempts}")

    def _progress_now(self, state: _RunState) -> None:
        if state.last_progress is None:
            return
        phase, step, total = state.last_progress
        try:
            result = self.store.progress(state.job_id, phase, step, total, state.frames_done)
        except Exception as exc:
            # Progress is informational: a Redis blip must not stop the run.
            logger.warning("progress update of job %s failed: %s", state.job_id, exc)
            return
        state.cancel_seen = state.cancel_seen or result.cancel_requested

    def _should_cancel(self, state: _RunState) -> bool:
        if state.lease.lost or state.cancel_seen:
            return True
        try:
            state.cancel_seen = self.store.cancel_requested(state.job_id)
        except Exception as exc:
            logger.warning("cancel check of job %s failed: %s", state.job_id, exc)
        return state.cancel_seen

    def _write_outputs(
        self,
        record: JobRecord,
        result: Any,
        condition_images: Sequence[tuple[str, Image.Image]] = (),
    ) -> list[dict[str, Any]]:
        params = record.input
        if record.kind is JobKind.sequence:
            return self._write_sequence(record, result)
        outputs = [("source", 0, params.source_prompt, result.source)]
        outputs += [
            ("target", k, prompt, image)
            for k, (prompt, image) in enumerate(
                zip(params.target_prompts, result.targets, strict=True)
            )
        ]
        outputs += [
            ("condition", k, prompt, image) for k, (prompt, image) in enumerate(condition_images)
        ]
        images = []
        for role, index, prompt, image in outputs:
            key = result_key(record.id, role, index)
            self.retry(self.storage.put, key, png_bytes(image), "image/png")
            images.append(
                {
                    "role": role,
                    "prompt": prompt,
                    "key": key,
                    "width": image.width,
                    "height": image.height,
                }
            )
        return images

    def _write_sequence(self, record: JobRecord, result: Any) -> list[dict[str, Any]]:
        """The source, every frame, and the frames as an MP4 and an animated WebP."""
        params = record.input
        prompts = params.target_prompts
        if len(prompts) == 1:
            prompts = prompts * len(result.frames)
        outputs = [("source", 0, params.source_prompt, result.source)]
        outputs += [
            ("frame", k, prompt, frame)
            for k, (prompt, frame) in enumerate(zip(prompts, result.frames, strict=True))
        ]
        images = []
        for role, index, prompt, image in outputs:
            key = result_key(record.id, role, index)
            self.retry(self.storage.put, key, png_bytes(image), "image/png")
            images.append(self._output(role, prompt, key, image.size))
        fps = params.animation_fps or DEFAULT_ANIMATION_FPS
        for extension, encode in (("mp4", encode_mp4), ("webp", encode_webp)):
            key = animation_key(record.id, extension)
            self.retry(self.storage.put, key, encode(result.frames, fps), content_type_for(key))
            images.append(
                self._output("animation", params.target_prompts[0], key, result.frames[0].size)
            )
        return images

    @staticmethod
    def _output(role: str, prompt: str, key: str, size: tuple[int, int]) -> dict[str, Any]:
        return {"role": role, "prompt": prompt, "key": key, "width": size[0], "height": size[1]}

    def _metrics(self, record: JobRecord, stats: Any, engine_seconds: float) -> dict[str, Any]:
        now = time.time()
        started_at = record.started_at or now
        metrics: dict[str, Any] = {
            "queue_seconds": round(max(0.0, started_at - record.created_at), 3),
            "inversion_seconds": round(stats.inversion_seconds, 3),
            "denoise_seconds": round(stats.denoise_seconds, 3),
            "total_seconds": round(max(0.0, now - record.created_at), 3),
            "unet_image_evals": stats.unet_image_evals,
            "condition_evals": stats.condition_evals,
            # Not in the public object; the benchmark and operators read them from the record.
            "engine_seconds": round(engine_seconds, 4),
            "attempt": record.attempts,
        }
        if stats.peak_memory_bytes is not None:
            metrics["peak_memory_bytes"] = stats.peak_memory_bytes
        return metrics
