"""The janitor: puts jobs whose worker is gone back in their queue, and trims the inversion cache.

With the Redis broker, Celery redelivers an unacknowledged message only after the visibility
timeout, which must exceed the longest job (an hour by default). The janitor does not wait for
that. A job's worker is gone when the job has no lease and either

- it is ``running`` and started over a lease lifetime ago (the worker died or stalled mid-run), or
- it is ``queued`` but a worker took its message over a lease lifetime ago (``JobStore.take``)
  and never started it (the worker died between receiving the message and starting the job).

``JobStore.requeue`` then makes it ``queued`` again with its queue position, a ``requeued``
event and a fresh ``masactrl.run_job`` message, all in one step: the API never shows a stale
``running``, only one janitor acts on a job, and no crash in between can lose the message. Every
worker runs a janitor.

It also ends the queued jobs whose deadline passed (``expired``) for every model that has had a
worker, so a deadline holds while no message for the model arrives; the store returns each
expired job to the one call that ended it, which sends its ``job.expired`` webhook.
"""

from __future__ import annotations

import logging

from masactrl_jobs.queue import TaskMessages
from masactrl_jobs.store import JobStore
from worker.inversion_cache import InversionCache
from worker.webhooks import Emitter

__all__ = ["Janitor"]

logger = logging.getLogger(__name__)


class Janitor:
    """One pass every ``interval`` seconds (driven by :class:`worker.leases.Periodic`)."""

    def __init__(
        self,
        store: JobStore,
        *,
        lease_ttl: float,
        emitter: Emitter | None = None,
        cache: InversionCache | None = None,
    ) -> None:
        self.store = store
        self.lease_ttl = lease_ttl
        self.emitter = emitter
        self.cache = cache
        self._messages = TaskMessages()

    def run_once(self) -> list[str]:
        """Requeue jobs whose worker is gone, expire queued jobs past their deadline (and sweep
        the cache); returns the requeued ids."""
        self.expire()
        requeued = []
        for job_id in self.store.stale_jobs(older_than=self.lease_ttl):
            record = self.store.get(job_id)
            if record is None:
                # Expired and purged while its note stayed behind: nothing to recover.
                self.store.untake(job_id)
                continue
            message = self._messages.build(job_id, record.model)
            attempts = self.store.requeue(job_id, self.lease_ttl, message)
            if attempts is None:
                continue  # another janitor acted, a worker took the lease, or the job ended
            logger.warning(
                "job %s lost its worker after %d attempt(s); requeued on masactrl.%s",
                job_id,
                attempts,
                record.model,
            )
            if self.emitter is not None:
                fresh = self.store.get(job_id)
                if fresh is not None:
                    self.emitter.emit(fresh, "job.requeued", suffix=str(attempts))
            requeued.append(job_id)
        if self.cache is not None:
            self.cache.sweep()
        return requeued

    def expire(self) -> list[str]:
        """End queued jobs past their deadline; returns their ids."""
        expired = self.store.expire_due(sorted(self.store.worker_models()))
        for job_id in expired:
            logger.info("job %s was not started by its deadline: expired", job_id)
            if self.emitter is not None:
                self.emitter.emit_terminal(job_id)
        return expired
