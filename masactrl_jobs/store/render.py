"""The public job object (``JobPublic``) of a stored job, as the API serves it."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from masactrl_jobs.schema import (
    JobError,
    JobMetrics,
    JobOutput,
    JobPreview,
    JobProgress,
    JobPublic,
    JobStatus,
    JobUrls,
    JobWebhook,
    OutputImage,
    PreviewImage,
    WebhookDelivery,
)

if TYPE_CHECKING:
    from masactrl_jobs.store.records import JobRecord, PreviewRecord

__all__ = ["DEFAULT_RETENTION_SECONDS", "public_job", "public_preview"]

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def public_preview(preview: PreviewRecord, url_for: Callable[[str], str]) -> JobPreview:
    """A live preview as the API shows it (the job's ``preview``, the ``preview`` SSE event):
    its keys become the short-lived URLs ``url_for`` makes."""
    return JobPreview.model_construct(
        step=preview.step,
        steps=preview.steps,
        images=[
            PreviewImage.model_construct(role=i.role, index=i.index, url=url_for(i.key))
            for i in preview.images
        ],
    )


def public_job(
    record: JobRecord,
    *,
    base_url: str,
    url_for: Callable[[str], str],
    url_ttl_seconds: int,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
    now: float | None = None,
    preview_url_for: Callable[[str], str] | None = None,
) -> JobPublic:
    """The job object of ``record``: output keys become presigned URLs made by ``url_for``.

    Output URLs expire with the presigned URL or the job's retention, whichever comes first;
    ``queue_seconds`` and ``total_seconds`` are derived from the timestamps unless recorded.
    The latest live preview is shown while the job runs, its URLs made by ``preview_url_for``
    (short-lived; ``url_for`` when not given).
    """
    now = time.time() if now is None else now
    base = base_url.rstrip("/")
    progress = None
    if record.progress is not None:
        p = record.progress
        progress = JobProgress(
            phase=p.phase,
            step=p.step,
            total=p.total,
            fraction=p.fraction,
            frames_done=p.frames_done,
        )
    output = None
    if record.output is not None:
        expires = now + url_ttl_seconds
        if record.completed_at is not None:
            expires = min(expires, record.completed_at + retention_seconds)
        output = JobOutput(
            images=[
                OutputImage(
                    url=url_for(image.key),
                    role=image.role,
                    prompt=image.prompt,
                    key=image.key,
                    width=image.width,
                    height=image.height,
                )
                for image in record.output.images
            ],
            expires_at=_dt(expires),
        )
    preview = None
    if record.preview is not None and record.status is JobStatus.running:
        preview = public_preview(record.preview, preview_url_for or url_for)
    metrics = dict(record.metrics or {})
    if record.started_at is not None:
        metrics.setdefault("queue_seconds", round(record.started_at - record.created_at, 3))
    if record.completed_at is not None:
        metrics.setdefault("total_seconds", round(record.completed_at - record.created_at, 3))
    webhook = None
    if record.webhook:
        webhook = JobWebhook(
            url=record.webhook["url"],
            events=record.webhook["events"],
            deliveries=[WebhookDelivery.model_validate(d) for d in record.deliveries],
        )
    error = None
    if record.error is not None:
        error = JobError(code=record.error.code, message=record.error.message)
    # Constructed, not validated: every value comes from the record, which was validated on the
    # way in; this runs for every job shown, so the saved validation is worth having.
    return JobPublic.model_construct(
        id=record.id,
        kind=record.kind,
        status=record.status,
        created_at=datetime.fromtimestamp(record.created_at, tz=timezone.utc),
        started_at=_dt(record.started_at),
        completed_at=_dt(record.completed_at),
        model=record.model,
        input=record.input,
        queue_position=record.queue_position,
        priority=record.priority,
        start_by=_dt(record.deadline_at),
        retry_of=record.retry_of,
        retried_by=record.retried_by,
        progress=progress,
        preview=preview,
        output=output,
        error=error,
        metrics=JobMetrics.model_validate(metrics) if metrics else None,
        attempts=record.attempts,
        webhook=webhook,
        warnings=list(record.warnings),
        urls=JobUrls.model_construct(
            self_=f"{base}/v1/jobs/{record.id}",
            cancel=f"{base}/v1/jobs/{record.id}/cancel",
            events=f"{base}/v1/jobs/{record.id}/events",
            retry=f"{base}/v1/jobs/{record.id}/retry",
        ),
    )
