"""The Celery app both sides share, without any task code: the gateway sends by task name.

Importing this module imports Celery and kombu only; the worker registers its tasks on the app it
gets from :func:`make_celery` and adds its own consumer settings (acks_late, prefetch, limits).
With the Redis transport each queue is a Redis list named after it, e.g. ``masactrl.sd15``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

__all__ = [
    "DELIVER_WEBHOOK_TASK",
    "RUN_JOB_TASK",
    "WEBHOOK_QUEUE",
    "enqueue_job",
    "make_celery",
    "queue_name",
]

RUN_JOB_TASK = "masactrl.run_job"
DELIVER_WEBHOOK_TASK = "masactrl.deliver_webhook"
WEBHOOK_QUEUE = "masactrl.webhooks"


def queue_name(model: str) -> str:
    """The queue of one catalog model's GPU workers."""
    return f"masactrl.{model}"


def make_celery(
    broker_url: str,
    *,
    visibility_timeout: float | None = None,
    connect_timeout: float = 2.0,
    **config: Any,
) -> Celery:
    """A Celery app on the Redis broker at ``broker_url``; ``config`` overrides any setting.

    ``visibility_timeout`` matters to consumers only: an unacknowledged message is redelivered
    after it, so it must exceed the longest job (the workers pass theirs).
    """
    app = Celery("masactrl", broker=broker_url, set_as_current=False)
    transport: dict[str, Any] = {
        # A dead broker must fail a submission quickly (the gateway answers 503), not hang it.
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": 10.0,
    }
    if visibility_timeout is not None:
        transport["visibility_timeout"] = visibility_timeout
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Job state lives in the job store; a Celery result backend would be a second truth.
        task_ignore_result=True,
        task_create_missing_queues=True,
        broker_transport_options=transport,
        broker_connection_timeout=connect_timeout,
        broker_connection_retry_on_startup=True,
        # A publish that cannot reach Redis is retried briefly, then surfaces as an error the
        # gateway turns into a 503 and a failed job.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.1,
            "interval_max": 0.2,
        },
        enable_utc=True,
    )
    app.conf.update(config)
    return app


def enqueue_job(app: Celery, job_id: str, model: str) -> None:
    """Send ``masactrl.run_job(job_id)`` to the model's queue."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_name(model))
