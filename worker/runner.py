"""Running one job on a loaded engine: the exactly-once protocol, progress, cancel and errors.

``JobRunner.run(job_id)`` is what ``masactrl.run_job`` does in a GPU worker. Messages arrive at
least once (late acks, broker redelivery, the janitor); the job's effect happens once:

0. note that this worker took the message (``take``): if it dies before step 2, the janitor
   replaces the message (fair) or requeues the job (fifo) within a lease lifetime instead of the
   broker's hour;
1. a job that is cancelled announces it (a queued job cancelled before pickup ends without
   reading its inputs, and its ``job.canceled`` webhook goes out here);
2. ask the store which job this message starts (``JobStore.claim``, one Lua script): under the
   queue policy (``MASACTRL_QUEUE_POLICY=fair``) every message for the model is one start, and
   the store picks the job by fair share between tenants, then priority, then submission order;
   under ``fifo`` it is the message's own job, as Celery delivered it. The script takes the
   job's lease, marks it running (``attempts`` + 1: this run's fencing token) and ends queued
   jobs past their deadline (``expired``, never started), all in one step, so no two messages
   start one job. Nothing to start: acknowledge and drop;
3. renew the lease in the background;
4. run the job's kind (``masactrl_jobs.kinds``, looked up by ``record.kind``): load its inputs,
   run the engine, write ``results/<job_id>/<role>_<k>.png`` (a rerun overwrites the same keys),
   then mark the job ``succeeded``; a worker that lost its lease writes nothing. What a kind's run
   gets from the worker is ``worker.context.JobContext``.
   A job with ``previews`` publishes small previews while it runs (``worker.previews``), under
   ``results/<job_id>/previews/``; they are deleted once it succeeded, with its results otherwise.
   Prompt words outside the vocabulary the model declares (``masactrl_core.vocabulary``) are
   not refused: they become the job's ``warnings``, written with whichever end it reaches.

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
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from masactrl_core import InvalidInput, JobCancelled, MasaCtrlEngine
from masactrl_core.previews import PreviewDecoder
from masactrl_jobs.catalog import ModelEntry, UnknownLora
from masactrl_jobs.kinds import Kind, kind_of
from masactrl_jobs.kinds.base import AnimationOutput, JobInputError, Output
from masactrl_jobs.queue import enqueue_job
from masactrl_jobs.schema import ErrorCode, JobInput, JobStatus
from masactrl_jobs.storage import (
    Storage,
    StorageError,
    animation_key,
    content_type_for,
    result_key,
    results_prefix,
)
from masactrl_jobs.store import FinishResult, JobRecord, JobStore
from worker.config import WorkerSettings
from worker.context import Failure, JobContext
from worker.engine_loader import CatalogLoras, ConditionModels
from worker.inversion_cache import InversionCache
from worker.leases import JobLease
from worker.outputs import png_bytes
from worker.retry import Retrier
from worker.webhooks import Emitter

__all__ = ["JobRunner"]

logger = logging.getLogger(__name__)

# What a run did, for logs and tests.
Outcome = Literal[
    "succeeded",
    "failed",
    "canceled",
    "missing",
    "dropped",
    "rerouted",
    "leased",
    "abandoned",
    "conflict",
]


def _prompt_fields(job: JobInput) -> list[tuple[str, str]]:
    """The job's prompts, each with its field's path as the API names it."""
    fields = [("source_prompt", job.source_prompt)]
    fields += [(f"target_prompts[{i}]", prompt) for i, prompt in enumerate(job.target_prompts)]
    return [*fields, ("negative_prompt", job.negative_prompt)]


class _Abandon(Exception):
    """This worker lost the job's lease: another one runs it now, so write nothing."""


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
        self.sleep = sleep
        self.retry = Retrier(
            settings.storage_retry_attempts, settings.storage_retry_max_wait_seconds
        )
        # Store writes wait out a Redis restart for a lease lifetime: past that, another worker
        # may run the job, and the fence decides.
        self.store_retry = Retrier(max_wait=1.0, for_seconds=settings.lease_ttl)

    # -- the protocol ----------------------------------------------------------------------

    def run(self, job_id: str) -> Outcome:
        """Run (or drop) the job; returns what happened, for logs and tests."""
        self.store_retry(self.store.take, job_id)
        outcome = self._run_taken(job_id)
        if outcome in ("missing", "dropped", "rerouted", "canceled"):
            # Nothing left for the janitor to recover (a started job left the note behind).
            self._quietly(self.store.untake, job_id)
        return outcome

    def _run_taken(self, job_id: str) -> Outcome:
        record = self.store_retry(self.store.get, job_id)
        fifo = self.store.queue_policy == "fifo"
        if record is None:
            logger.info("job %s does not exist (expired?)", job_id)
            if fifo:
                return "missing"
        elif record.status.is_terminal():
            self._announce_queued_cancel(record.status, job_id)
            logger.info("job %s is already %s", job_id, record.status.value)
            if fifo:
                return "dropped"
        elif record.model != self.entry.name:
            logger.warning(
                "job %s is for model %s, not %s; rerouting", job_id, record.model, self.entry.name
            )
            enqueue_job(self.app, job_id, record.model)
            return "rerouted"

        # The store decides which job this message starts (the queue policy) and starts it
        # under this worker's lease, in one step.
        claimed = self.store_retry(
            self.store.claim, job_id, self.entry.name, self.worker_id, self.settings.lease_ttl
        )
        for ended in claimed.ended:
            self.emitter.emit_terminal(ended)
        if claimed.job_id != job_id and record is not None and not record.status.is_terminal():
            # Cancelled between the read above and the decision: still announce it.
            now = self.store_retry(self.store.get, job_id)
            if now is not None and job_id not in claimed.ended:
                self._announce_queued_cancel(now.status, job_id)
        if claimed.outcome == "leased":
            logger.info("job %s is being started by another worker; dropping", claimed.job_id)
            return "leased"
        if claimed.outcome != "started" or claimed.job_id is None:
            if job_id in claimed.ended:
                return "canceled"
            logger.info("message for job %s: nothing to start; dropping it", job_id)
            return "missing" if record is None else "dropped"
        started_id, attempt = claimed.job_id, claimed.attempts
        if started_id != job_id:
            logger.info("message for job %s starts job %s (queue policy)", job_id, started_id)
        lease = JobLease(
            self.store,
            started_id,
            self.worker_id,
            self.settings.lease_ttl,
            self.settings.lease_renew_interval,
        )
        try:
            lease.start_heartbeat(attempt)
            started = self.store_retry(self.store.get, started_id)
            if started is None:
                return "missing"
            if attempt > self.settings.max_attempts:
                return self._fail(
                    started_id,
                    attempt,
                    Failure(
                        ErrorCode.worker_lost,
                        f"the job's worker stopped {attempt - 1} times while running "
                        "it; it is not tried again",
                    ),
                    {},
                )
            logger.info("job %s: attempt %d on %s", started_id, attempt, self.worker_id)
            self.emitter.emit(started, "job.started", suffix=str(attempt))
            return self._execute(started, attempt, lease)
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

    def _execute(self, record: JobRecord, attempt: int, lease: JobLease) -> Outcome:
        job_id = record.id
        kind = kind_of(record.kind)
        ctx = JobContext(self, record, lease, kind.preview_role)
        metrics: dict[str, Any] = {}
        # Computed before the run so every end of the job keeps them: a failure may be what a
        # word the model does not know leads to.
        warnings = self.engine.prompt_warnings(_prompt_fields(record.input))
        try:
            images = self._run_kind(kind, ctx, metrics)
        except _Abandon:
            logger.warning("job %s: lease lost, leaving the job to its new worker", job_id)
            return "abandoned"
        except JobCancelled:
            ctx.progress_now()
            canceled = self.store_retry(
                self.store.finish_canceled,
                job_id,
                metrics or None,
                attempt=attempt,
                warnings=warnings,
            )
            if not canceled.ok:
                return self._superseded(job_id, attempt, canceled)
            self._delete_results(job_id)
            self.emitter.emit_terminal(job_id)
            logger.info("job %s canceled", job_id)
            return "canceled"
        except InvalidInput as exc:
            failure = Failure(ErrorCode.invalid_input, str(exc))
            return self._fail(job_id, attempt, failure, metrics, warnings)
        except Failure as failure:
            return self._fail(job_id, attempt, failure, metrics, warnings)
        except (redis.ConnectionError, redis.TimeoutError):
            logger.exception("job %s: Redis unreachable; the job will be rerun", job_id)
            raise
        except Exception:
            logger.exception("job %s failed unexpectedly", job_id)
            return self._fail(
                job_id,
                attempt,
                Failure(ErrorCode.internal_error, "the worker hit an unexpected error (logged)"),
                metrics,
                warnings,
            )
        finish = self.store_retry(
            self.store.succeed, job_id, images, metrics, attempt=attempt, warnings=warnings
        )
        if not finish.ok:
            return self._superseded(job_id, attempt, finish)
        if ctx.previews is not None:
            ctx.previews.remove()  # the results replace them
        self.emitter.emit_terminal(job_id)
        logger.info(
            "job %s succeeded in %.2f s (engine %.2f s)",
            job_id,
            metrics.get("total_seconds", 0.0),
            metrics.get("engine_seconds", 0.0),
        )
        return "succeeded"

    def _superseded(self, job_id: str, attempt: int, finish: FinishResult) -> Outcome:
        logger.warning(
            "job %s: attempt %d may not end the job (%s, now %s); leaving it as it is",
            job_id,
            attempt,
            finish.outcome,
            finish.previous,
        )
        return "conflict"

    def _fail(
        self,
        job_id: str,
        attempt: int,
        failure: Failure,
        metrics: dict[str, Any],
        warnings: Sequence[str] = (),
    ) -> Outcome:
        logger.warning("job %s failed: %s: %s", job_id, failure.code.value, failure.message)
        failed = self.store_retry(
            self.store.fail,
            job_id,
            failure.code.value,
            failure.message,
            metrics or None,
            attempt=attempt,
            warnings=warnings,
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

    # -- the job's kind ----------------------------------------------------------------------

    def _run_kind(
        self, kind: Kind[Any, Any, Any], ctx: JobContext, metrics: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The kind's steps (load, run, outputs) with what surrounds every kind's run; what
        can go wrong becomes a :class:`Failure` with its code, or ends the run as it is
        (cancelled, lease lost, Redis unreachable)."""
        record = ctx.record
        try:
            return self._run_steps(kind, ctx, metrics)
        except JobCancelled:
            if ctx.lease.lost:
                raise _Abandon from None
            raise
        except SoftTimeLimitExceeded:
            raise Failure(
                ErrorCode.timeout,
                f"the job ran longer than {self.settings.soft_time_limit_seconds:g} s; "
                "try fewer steps, fewer targets or a smaller size",
            ) from None
        except (InvalidInput, Failure):
            raise
        except JobInputError as exc:
            raise Failure(ErrorCode.invalid_input, str(exc)) from None
        except StorageError as exc:
            raise Failure(
                ErrorCode.storage_unavailable, f"storage failed while running the job: {exc}"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # cannot record anything in Redis; the lease lapses and the job reruns
        except Exception as exc:
            if _is_out_of_memory(exc):
                _release_gpu_memory()
                raise Failure(
                    ErrorCode.out_of_memory,
                    f"the GPU ran out of memory at {record.input.width}x{record.input.height} "
                    f"with {len(record.input.target_prompts)} target prompt(s); try a smaller "
                    "width/height or fewer target prompts",
                ) from exc
            raise

    def _run_steps(
        self, kind: Kind[Any, Any, Any], ctx: JobContext, metrics: dict[str, Any]
    ) -> list[dict[str, Any]]:
        record = ctx.record
        source = kind.load(ctx)
        # Only this job's adapters are active while it runs, and none after it (even on errors),
        # so a job without adapters runs on the plain model as it is.
        adapters = self._adapters(record)
        active: AbstractContextManager[None] = (
            self.engine.loras.activated(adapters) if adapters else nullcontext()
        )
        try:
            with active:
                ran = kind.run(ctx, source)
        finally:
            # No preview may land after the results or the end of the job.
            if ctx.previews is not None:
                ctx.previews.close()
        metrics.update(self._metrics(record, ran.stats, ran.engine_seconds))
        if ctx.lease.lost:
            raise _Abandon
        images = self._write_outputs(record.id, kind.outputs(record.input, ran))
        metrics["total_seconds"] = round(max(0.0, time.time() - record.created_at), 3)
        return images

    def _adapters(self, record: JobRecord) -> dict[str, float]:
        """The job's LoRA adapters with their weights, loaded on first use."""
        from masactrl_core import ModelLoadError

        try:
            return self.loras.weights(record.input.loras)
        except UnknownLora as exc:
            raise Failure(ErrorCode.invalid_input, str(exc)) from None
        except ModelLoadError as exc:
            raise Failure(ErrorCode.internal_error, str(exc)) from exc

    def _write_outputs(self, job_id: str, outputs: Sequence[Output]) -> list[dict[str, Any]]:
        """Store the results (a rerun overwrites the same keys); the job's list of them."""
        images = []
        for output in outputs:
            if isinstance(output, AnimationOutput):
                key = animation_key(job_id, output.extension)
                self.retry(self.storage.put, key, output.data, content_type_for(key))
                images.append(self._output("animation", output.prompt, key, output.size))
            else:
                key = result_key(job_id, output.role.value, output.index)
                self.retry(self.storage.put, key, png_bytes(output.image), "image/png")
                images.append(
                    self._output(output.role.value, output.prompt, key, output.image.size)
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
