"""The worker-side Celery app: the shared app from ``masactrl_jobs.queue`` plus consumer settings.

Pool choice for GPU workers: **prefork with concurrency 1**. One job per GPU (two would fight over
memory), in a child process, because only then does Celery enforce time limits (the solo pool
cannot interrupt a task) and can the parent survive the child: a CUDA crash or an OOM kill costs
a model reload, not the worker's broker connection, and ``task_reject_on_worker_lost`` requeues
the message. The model is loaded in the child (``worker_process_init``), never in the parent,
so CUDA is never initialized before a fork.

The webhook worker uses the threads pool: deliveries wait on the network, not the CPU.
"""

from __future__ import annotations

from celery import Celery

from masactrl_jobs.queue import WEBHOOK_QUEUE, make_celery, queue_name
from worker.config import WorkerSettings
from worker.tasks import register_tasks

__all__ = ["create_worker_app", "worker_queue"]


def worker_queue(model: str | None) -> str:
    """The queue a worker consumes: ``masactrl.<model>``, or ``masactrl.webhooks``."""
    return queue_name(model) if model else WEBHOOK_QUEUE


def create_worker_app(settings: WorkerSettings) -> Celery:
    """A Celery app that consumes with the reliability settings below and knows both tasks."""
    app = make_celery(
        settings.redis_target,
        # Redis redelivers an unacknowledged message after this long: longer than any job may
        # run, or a healthy long job would be started a second time.
        visibility_timeout=settings.visibility_timeout_seconds,
    )
    app.conf.update(
        # Ack after the task ran (see worker.tasks for the per-task reasons).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A job that failed or timed out is recorded as failed; redelivering it would rerun it.
        task_acks_on_failure_or_timeout=True,
        # Reserve one message per process: a second would wait behind a long job while another
        # worker sits idle, and would be redelivered late if this worker died.
        worker_prefetch_multiplier=1,
        # One job per GPU.
        worker_concurrency=1,
        # Children inherit the configured runtime; spawn would re-import without it.
        worker_pool_start_method="fork",
        # Loading a model in worker_process_init takes far longer than Celery's default 4 s.
        worker_proc_alive_timeout=settings.engine_load_timeout_seconds,
        # Keep reconnecting to a restarting Redis forever rather than exiting.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # A running job keeps going while the broker reconnects: its state lives in the job
        # store, and the message's late redelivery is dropped because the job is terminal.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Logs go through our handlers, not Celery's replacement of the root logger.
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    register_tasks(app, settings)
    return app
