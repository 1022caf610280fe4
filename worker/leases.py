"""Job leases with a heartbeat, and the periodic threads a worker process runs.

A lease is a Redis key (``masactrl:job:<id>:lease``, managed by ``masactrl_jobs.store.JobStore``)
holding the id of the worker running the job, with a TTL. While the job runs, a thread renews it
every third of its lifetime. If the worker dies, renewals stop, the key expires, and the janitor
knows the job needs another worker. If a renewal finds the lease taken, or the job requeued or
started again, this worker has been declared dead (a long stall, a partition): it must stop and
write nothing. A lease that merely lapsed while Redis was away is taken back, because the job
still runs this attempt. The lease decides who works; the attempt number decides who may finish
(``JobStore.succeed(..., attempt=)``), so a worker that wakes up late cannot end the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from masactrl_jobs.store import JobStore

__all__ = ["JobLease", "Periodic"]

logger = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn`` every ``interval`` seconds on a daemon thread until :meth:`stop`.

    Exceptions are logged and the loop goes on: a heartbeat must survive a Redis restart.
    """

    def __init__(self, name: str, interval: float, fn: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self._fn = fn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, *, run_now: bool = True) -> Periodic:
        """Start the thread (calling ``fn`` at once when ``run_now``)."""
        self._thread = threading.Thread(
            target=self._loop, args=(run_now,), name=self.name, daemon=True
        )
        self._thread.start()
        return self

    def _loop(self, run_now: bool) -> None:
        if not run_now and self._stop.wait(self.interval):
            return
        while True:
            try:
                self._fn()
            except Exception as exc:
                logger.warning("%s failed: %s", self.name, exc)
            if self._stop.wait(self.interval):
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait (briefly) for the thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class JobLease:
    """One job's lease, held by this worker and renewed in the background while the job runs."""

    def __init__(
        self, store: JobStore, job_id: str, worker_id: str, ttl: float, renew_every: float
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.ttl = ttl
        self.renew_every = renew_every
        # After a failed renewal, try again soon: when Redis comes back the lease may have
        # lapsed, and this worker should take it back before a janitor requeues the job.
        self.retry_every = min(renew_every, 0.5)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        """True once another worker took the job or it ended elsewhere: stop and write nothing."""
        return self._lost.is_set()

    def acquire(self) -> bool:
        """Take the lease; False when another worker holds it (its job is still alive)."""
        return self.store.acquire_lease(self.job_id, self.worker_id, self.ttl)

    def start_heartbeat(self, attempt: int) -> None:
        """Renew the lease for run ``attempt`` of the job until :meth:`release`."""
        self._thread = threading.Thread(
            target=self._renew_until_stopped,
            args=(attempt,),
            name=f"lease-{self.job_id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _renew_until_stopped(self, attempt: int) -> None:
        wait = self.renew_every
        while not self._stop.wait(wait):
            try:
                renewed = self.store.renew_lease(self.job_id, self.worker_id, self.ttl, attempt)
            except Exception as exc:
                # Redis unreachable. That alone never means the lease is lost: while this worker
                # cannot reach Redis, a worker that can may start the job, and then the renewal
                # after the outage says so, and the fenced finish refuses this attempt anyway.
                logger.warning("renewing the lease of job %s failed: %s", self.job_id, exc)
                wait = self.retry_every
                continue
            if not renewed:
                logger.error(
                    "lost the lease of job %s: another worker took it or the job moved on; "
                    "abandoning the run",
                    self.job_id,
                )
                self._lost.set()
                return
            wait = self.renew_every

    def release(self) -> None:
        """Stop renewing and drop the lease if it is still ours (terminal writes drop it too)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self.lost:
            return
        try:
            self.store.release_lease(self.job_id, self.worker_id)
        except Exception as exc:  # it expires by itself
            logger.warning("releasing the lease of job %s failed: %s", self.job_id, exc)
