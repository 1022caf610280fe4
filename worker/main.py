"""Starting a worker process: ``run_gpu_worker`` and ``run_webhook_worker`` (what the CLI calls)."""

from __future__ import annotations

import logging
import socket

from masactrl_jobs.catalog import ModelEntry
from worker import runtime
from worker.celery_app import create_worker_app, worker_queue
from worker.config import WorkerSettings
from worker.engine_loader import resolve_source
from worker.logs import install_log_redaction

__all__ = ["run_gpu_worker", "run_webhook_worker"]

logger = logging.getLogger(__name__)

_COMMON_OPTIONS = {
    # Mingle, gossip and Celery's event heartbeats are cluster chatter this service does not use
    # (liveness is our own registry in Redis); leaving them out also speeds up start-up.
    "without_mingle": True,
    "without_gossip": True,
    "without_heartbeat": True,
    "optimization": "fair",
}


def run_gpu_worker(
    settings: WorkerSettings,
    entry: ModelEntry,
    *,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> int:
    """Serve ``masactrl.<entry.name>`` until stopped; returns the exit status."""
    install_log_redaction()
    source = resolve_source(entry, settings)
    app = create_worker_app(settings)
    runtime.configure(settings, app, "gpu", entry=entry, source=source)
    worker = app.Worker(
        hostname=hostname or f"gpu-{entry.name}@{socket.gethostname()}",
        queues=[worker_queue(entry.name)],
        pool_cls="prefork",
        concurrency=1,
        loglevel=loglevel,
        **_COMMON_OPTIONS,
    )
    worker.start()
    if runtime.start_failed():
        return 1
    return int(worker.exitcode or 0)


def run_webhook_worker(
    settings: WorkerSettings,
    *,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> int:
    """Deliver webhooks from ``masactrl.webhooks`` until stopped; returns the exit status."""
    install_log_redaction()
    app = create_worker_app(settings)
    runtime.configure(settings, app, "webhooks")
    worker = app.Worker(
        hostname=hostname or f"webhooks@{socket.gethostname()}",
        queues=[worker_queue(None)],
        pool_cls="threads",
        concurrency=concurrency or settings.webhook_concurrency,
        loglevel=loglevel,
        **_COMMON_OPTIONS,
    )
    worker.start()
    return int(worker.exitcode or 0)
