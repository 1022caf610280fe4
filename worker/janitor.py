"""The janitor: re-enqueues jobs whose worker died, and trims the inversion cache.

With the Redis broker, Celery redelivers an unacknowledged message only after the visibility
timeout, which must exceed the longest job (an hour by default). The janitor does not wait for
that: a running job whose lease has lapsed lost its worker, so the janitor sends a fresh
``masactrl.run_job`` to its model's queue. Every worker runs one; ``JobStore.claim_stale`` makes
sure only one janitor acts on a given job, and a marker stops the same job from being re-enqueued
again and again while its new message waits in a busy queue.
"""

from __future__ import annotations

import logging

from celery import Celery

from masactrl_jobs.queue import enqueue_job
from masactrl_jobs.store import JobStore
from worker.inversion_cache import InversionCache

__all__ = ["Janitor", "clear_requeue_marker"]

logger = logging.getLogger(__name__)


def clear_requeue_marker(store: JobStore, job_id: str) -> None:
    """Called by the worker that took the job: if it dies too, the janitor may act again."""
    store.clear_requeued(job_id)


class Janitor:
    """One pass every ``interval`` seconds (driven by :class:`worker.leases.Periodic`)."""

    def __init__(
        self,
        store: JobStore,
        app: Celery,
        *,
        lease_ttl: float,
        requeue_marker_ttl: float,
        cache: InversionCache | None = None,
    ) -> None:
        self.store = store
        self.app = app
        self.lease_ttl = lease_ttl
        self.requeue_marker_ttl = requeue_marker_ttl
        self.cache = cache

    def run_once(self) -> list[str]:
        """Re-enqueue abandoned jobs (and sweep the cache); returns the re-enqueued ids."""
        requeued = []
        # A job is taken (lease set) before it is marked running, so a running job without a
        # lease for longer than a lease lifetime has certainly lost its worker.
        for job_id in self.store.stale_running(older_than=self.lease_ttl):
            if not self.store.claim_stale(job_id, older_than=self.lease_ttl):
                continue  # another janitor got it, or a worker just took the lease
            record = self.store.get(job_id)
            if record is None or record.status.is_terminal():
                continue
            if not self.store.mark_requeued(job_id, self.requeue_marker_ttl):
                continue  # already re-enqueued; that message has not been picked up yet
            try:
                enqueue_job(self.app, job_id, record.model)
            except Exception:
                self.store.clear_requeued(job_id)
                raise
            logger.warning(
                "job %s lost its worker (attempt %d); re-enqueued on masactrl.%s",
                job_id,
                record.attempts,
                record.model,
            )
            requeued.append(job_id)
        if self.cache is not None:
            self.cache.sweep()
        return requeued
