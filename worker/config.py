"""Settings of the worker processes (GPU workers and the webhook-delivery worker).

One class for both kinds, read from ``MASACTRL_*`` variables like every other process. The times
that make recovery work fit together like this (defaults in brackets)::

    lease_ttl [30 s]  <  recovery [60 s]  <  soft limit [600 s]  <  hard limit [660 s]
                                                                  <  visibility timeout [3600 s]

A running job's lease is renewed every ``lease_ttl / 3``; when its worker dies the lease lapses
after at most ``lease_ttl`` and the janitor, which looks every ``janitor_interval``, re-enqueues
the job, so it runs again within ``lease_ttl + janitor_interval`` (≤ ``recovery_seconds``).
The broker's own redelivery (after the visibility timeout) is only the safety net.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from masactrl_jobs.settings import CommonSettings

__all__ = ["WorkerSettings"]


class WorkerSettings(CommonSettings):
    """Everything a worker process reads from the environment."""

    # --- which model, on what ---------------------------------------------------------------
    model: str | None = Field(
        None, description="Catalog model a GPU worker serves (`masactrl worker --model` wins)."
    )
    device: str | None = Field(None, description="cuda, cuda:1, mps or cpu; default: best.")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None,
        description="Weights dtype; default on GPUs float16 (bfloat16 for FLUX.1), float32 on CPU.",
    )
    offload: bool = Field(
        False,
        description="Model CPU offload: each component (text encoders, denoiser, VAE) on the GPU "
        "only while it runs, for a model the GPU cannot hold whole (FLUX.1 [dev] with T5 on "
        "40-48 GB); slower. Pair it with a preview_vae, or previews move the denoiser off.",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="CPU threads for torch; default: torch's choice."
    )
    model_cache_dir: str = Field(
        "var/models", description="Where models with an s3:// source are downloaded to."
    )
    warmup: bool = Field(True, description="Run one tiny job at start-up before taking work.")
    engine_load_timeout_seconds: float = Field(
        900, gt=0, description="How long loading and warming the model may take."
    )

    # --- time limits and redelivery ---------------------------------------------------------
    soft_time_limit_seconds: float = Field(
        600, gt=0, description="A job running longer fails with `timeout` (raised in the job)."
    )
    time_limit_seconds: float = Field(
        660, gt=0, description="Hard limit: the job's process is killed and replaced."
    )
    visibility_timeout_seconds: float = Field(
        3600, gt=0, description="Broker redelivery of unacknowledged messages; > hard limit."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="A job whose worker died this many times fails for good."
    )

    # --- leases, heartbeats, janitor ----------------------------------------------------------
    recovery_seconds: float = Field(
        60, gt=0, description="A dead worker's job is re-enqueued within this time."
    )
    lease_ttl_seconds: float | None = Field(
        None, gt=0, description="Lease lifetime; default half of recovery_seconds."
    )
    janitor_interval_seconds: float | None = Field(
        None, gt=0, description="How often the janitor looks; default a quarter of recovery."
    )
    worker_heartbeat_ttl_seconds: float = Field(
        30, gt=0, description="A worker missing heartbeats this long is no longer live."
    )

    # --- progress -------------------------------------------------------------------------------
    progress_interval_seconds: float = Field(
        0.25, ge=0, description="Least time between progress writes to the job and its events."
    )
    step_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Development only: sleep this long every step (demos of cancel/recovery).",
    )

    # --- live previews (jobs with `previews: true`) -------------------------------------------
    preview_every_steps: int = Field(
        5, ge=1, le=1000, description="Steps between previews decoded by a tiny autoencoder."
    )
    preview_vae_every_steps: int = Field(
        10,
        ge=1,
        le=1000,
        description="Steps between previews decoded by the model's own VAE (no `preview_vae` in "
        "the catalog entry): it costs as much as decoding the results, so less often.",
    )
    preview_min_interval_seconds: float = Field(
        0.5, ge=0, le=60, description="Least time between two previews of a job (a rate limit)."
    )
    preview_max_side: int = Field(
        256, ge=16, le=256, description="Previews are at most this many pixels on a side."
    )

    # --- storage retries ----------------------------------------------------------------------
    storage_retry_attempts: int = Field(
        5, ge=1, le=20, description="Tries of a storage or Redis call before giving up."
    )
    storage_retry_max_wait_seconds: float = Field(
        4.0, gt=0, description="Longest backoff between two tries."
    )

    # --- inversion cache ------------------------------------------------------------------------
    inversion_cache: bool = Field(True, description="Reuse inverted latents of repeated images.")
    inversion_cache_retention_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="Cached inversions unused this long are deleted."
    )
    inversion_cache_max_entries: int = Field(
        10_000, ge=1, description="At most this many cached inversions (least recent go first)."
    )

    # --- webhooks -------------------------------------------------------------------------------
    webhook_retry_delays_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0],
        min_length=1,
        description="Delays before the 2nd, 3rd, ... attempt (the 1st is immediate).",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts per event; later delays double the last one."
    )
    webhook_retry_max_delay_seconds: float = Field(
        10 * 3600, gt=0, description="Cap on the delay between two attempts."
    )
    webhook_retry_jitter: float = Field(
        0.1, ge=0, le=1, description="Each delay grows by a random fraction up to this."
    )
    webhook_timeout_seconds: float = Field(
        15.0, gt=0, le=60, description="Time limit of one delivery attempt."
    )
    webhook_max_response_bytes: int = Field(
        4096, ge=0, le=1024 * 1024, description="Response body read at most (then discarded)."
    )
    webhook_progress_interval_seconds: float = Field(
        1.0, ge=0, description="Least time between two job.progress webhooks of a job."
    )
    webhook_concurrency: int = Field(8, ge=1, le=256, description="Parallel deliveries.")
    webhook_scheduler_interval_seconds: float = Field(
        0.5, gt=0, le=60, description="How often due retries are moved onto the queue."
    )

    @model_validator(mode="after")
    def _check_worker_rules(self) -> WorkerSettings:
        if self.time_limit_seconds <= self.soft_time_limit_seconds:
            raise ValueError(
                "MASACTRL_TIME_LIMIT_SECONDS must be above MASACTRL_SOFT_TIME_LIMIT_SECONDS: the "
                "soft limit lets a job fail cleanly before the hard limit kills its process"
            )
        if self.visibility_timeout_seconds <= self.time_limit_seconds:
            raise ValueError(
                "MASACTRL_VISIBILITY_TIMEOUT_SECONDS must exceed MASACTRL_TIME_LIMIT_SECONDS, or "
                "the broker redelivers jobs that are still running"
            )
        if self.lease_ttl + self.janitor_interval > self.recovery_seconds:
            raise ValueError(
                "MASACTRL_LEASE_TTL_SECONDS plus MASACTRL_JANITOR_INTERVAL_SECONDS must not exceed "
                "MASACTRL_RECOVERY_SECONDS: a dead worker's job is re-enqueued within their sum"
            )
        if self.is_production and self.step_delay_seconds:
            raise ValueError(
                "MASACTRL_STEP_DELAY_SECONDS slows every job and is refused in production"
            )
        return self

    @property
    def lease_ttl(self) -> float:
        """Seconds a job's lease lives without a renewal."""
        return self.lease_ttl_seconds or self.recovery_seconds / 2

    @property
    def lease_renew_interval(self) -> float:
        """Renew three times per lifetime, so two missed renewals do not lose the lease."""
        return self.lease_ttl / 3

    @property
    def janitor_interval(self) -> float:
        """Seconds between two janitor passes."""
        return self.janitor_interval_seconds or self.recovery_seconds / 4
