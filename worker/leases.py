"""Job leases with a heartbeat, and the periodic threads a worker process runs.

A lease is a Redis key (``masactrl:job:<id>:lease``, managed by ``masactrl_jobs.store.JobStore``)
holding the id of the worker running the job, with a TTL. While the job runs, a thread renews it
every third of its lifetime. If the worker dies, renewals stop, the key expires, and the janitor
knows the job needs another worker. If a renewal finds the lease gone or taken, this worker has
been declared dead (a long stall, a partition): it must stop and write nothing.
"""

from __future__ import annotations

import logging
import threading
import time
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
        self._lost = threading.Event()
        self._last_renewed = 0.0
        self._heartbeat: Periodic | None = None

    @property
    def lost(self) -> bool:
        """True once the lease expired or went to another worker: stop and write nothing."""
        return self._lost.is_set()

    def acquire(self) -> bool:
        """Take the lease; False when another worker holds it (its job is still alive)."""
        acquired = self.store.acquire_lease(self.job_id, self.worker_id, self.ttl)
        if acquired:
            self._last_renewed = time.monotonic()
        return acquired

    def start_heartbeat(self) -> None:
        """Renew the lease every ``renew_every`` seconds until :meth:`release`."""
        self._heartbeat = Periodic(f"lease-{self.job_id[:8]}", self.renew_every, self._renew)
        self._heartbeat.start(run_now=False)

    def _renew(self) -> None:
        try:
            renewed = self.store.renew_lease(self.job_id, self.worker_id, self.ttl)
        except Exception as exc:
            # Redis unreachable: keep trying while the lease may still be ours. Past its TTL
            # another worker may have taken the job, so behave as if it were lost.
            if time.monotonic() - self._last_renewed > self.ttl:
                self._mark_lost(f"could not renew for {self.ttl:g} s ({exc})")
            else:
                logger.warning("renewing the lease of job %s failed: %s", self.job_id, exc)
            return
        if renewed:
            self._last_renewed = time.monotonic()
        else:
            self._mark_lost("it expired or another worker took it")

    def _mark_lost(self, why: str) -> None:
        if not self._lost.is_set():
            logger.error("lost the lease of job %s: %s; abandoning the run", self.job_id, why)
            self._lost.set()
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def release(self) -> None:
        """Stop renewing and drop the lease if it is still ours (terminal writes drop it too)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.lost:
            return
        try:
            self.store.release_lease(self.job_id, self.worker_id)
        except Exception as exc:  # it expires by itself
            logger.warning("releasing the lease of job %s failed: %s", self.job_id, exc)
