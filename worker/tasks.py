"""The two tasks, thin over the process runtime (``worker.runtime``).

``masactrl.run_job(job_id)`` runs a job on a GPU worker; ``masactrl.deliver_webhook(job_id,
message=None)`` drains a job's pending webhook events (``message`` None) or makes one attempt of
``message`` (a retry, or an event another component sends, e.g. ``{"type": "job.canceled"}``).
Neither raises for expected outcomes: a job's failure is recorded in the job, not in Celery.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.worker import state
from celery.worker.request import Request

from masactrl_jobs.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK
from worker import runtime
from worker.config import WorkerSettings

__all__ = ["JobRequest", "JobTask", "deliver_webhook", "register_tasks", "run_job"]

logger = logging.getLogger(__name__)


class JobRequest(Request):
    """A ``run_job`` delivery in the pool's parent: records hard time-limit kills, which bypass
    the task body."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        # Celery kills the child at the hard limit; the job is still `running`, so say why it
        # stopped instead of letting it rerun. The killed child's pid tells which attempt was
        # its own (a cold shutdown's kills are no timeouts, as Celery itself treats them).
        if soft or state.should_terminate or not self.args:
            return
        job_id = str(self.args[0])
        try:
            runtime.current().fail_timed_out(job_id, self.worker_pid)
        except Exception:
            logger.exception("could not record the timeout of job %s", job_id)


class JobTask(Task):
    """Base of ``run_job``, whose deliveries are :class:`JobRequest` objects."""

    Request = JobRequest


def run_job(self: Task, job_id: str) -> str:
    """Run one job (at most once in effect, however often the message arrives)."""
    return runtime.current().run_job(job_id)


def deliver_webhook(self: Task, job_id: str, message: dict[str, Any] | None = None) -> int:
    """Deliver a job's pending webhook events, or one attempt of ``message``."""
    return runtime.current().deliver_webhook(job_id, message)


def register_tasks(app: Celery, settings: WorkerSettings) -> None:
    """Register both tasks on ``app`` with the options that make delivery safe."""
    app.task(
        name=RUN_JOB_TASK,
        base=JobTask,
        bind=True,
        # Ack after the job ran: a worker that dies mid-job leaves its message to be redelivered.
        acks_late=True,
        # A pool child killed by the OOM killer or a signal requeues its message, not acks it.
        reject_on_worker_lost=True,
        # The job fails cleanly (code `timeout`) at the soft limit; the hard limit, a little
        # later, kills a child stuck inside a CUDA kernel where no exception can reach.
        soft_time_limit=settings.soft_time_limit_seconds,
        time_limit=settings.time_limit_seconds,
        ignore_result=True,
    )(run_job)
    app.task(
        name=DELIVER_WEBHOOK_TASK,
        bind=True,
        # Same at-least-once rule; receivers drop duplicates by webhook-id.
        acks_late=True,
        ignore_result=True,
    )(deliver_webhook)
