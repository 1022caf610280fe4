"""What one worker process holds for its lifetime, and the Celery signals that build it.

A GPU worker is a Celery prefork pool with one child process. The parent consumes messages and
never imports torch; the child loads the engine once in ``worker_process_init`` (warms it with a
tiny run), then announces the model as live and runs the janitor. If the child dies (the OOM
killer, a segfault, the hard time limit), the parent starts a new one, which loads the model again.

The webhook worker runs a thread pool in a single process; its runtime starts on ``worker_ready``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import socket
from dataclasses import dataclass
from typing import Any, Literal

from celery import Celery
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.storage import Storage, storage_from_settings
from masactrl_jobs.store import JobRecord, JobStore
from worker.config import WorkerSettings
from worker.inversion_cache import InversionCache
from worker.janitor import Janitor
from worker.leases import Periodic
from worker.webhooks import Deliverer, Emitter, RetryPolicy, RetryScheduler

__all__ = [
    "Role",
    "WorkerRuntime",
    "configure",
    "current",
    "is_local_process",
    "new_worker_id",
    "reset",
    "start_failed",
]

logger = logging.getLogger(__name__)

Role = Literal["gpu", "webhooks"]


@dataclass(frozen=True)
class _Config:
    settings: WorkerSettings
    app: Celery
    role: Role
    entry: ModelEntry | None
    source: str | None


_config: _Config | None = None
_current: WorkerRuntime | None = None
# Set by a pool child that could not load its model. Made before the pool forks, so the parent
# sees it and exits with a failure status instead of Celery's 0 after the cold shutdown.
_start_failed = multiprocessing.Event()


def configure(
    settings: WorkerSettings,
    app: Celery,
    role: Role,
    *,
    entry: ModelEntry | None = None,
    source: str | None = None,
) -> None:
    """Set what this process (and its forked pool children) will run; call before starting."""
    global _config, _current
    _config = _Config(settings, app, role, entry, source)
    _current = None


def start_failed() -> bool:
    """Whether a GPU pool child of this process could not load (or refused) its model."""
    return _start_failed.is_set()


def reset() -> None:
    """Forget the configuration and the runtime (for tests that configure in-process)."""
    global _config, _current
    _config = None
    _current = None


def current() -> WorkerRuntime:
    """This process's runtime, created on first use."""
    global _current
    if _current is None:
        if _config is None:
            raise RuntimeError("worker.runtime.configure() was not called in this process")
        _current = WorkerRuntime(_config)
    return _current


def new_worker_id(role: str) -> str:
    """Unique per process: a restarted pool child must not inherit its predecessor's leases."""
    return f"{socket.gethostname()}:{role}:{os.getpid()}:{secrets.token_hex(3)}"


def is_local_process(worker_id: str, pid: int | None) -> bool:
    """Whether ``worker_id`` (from :func:`new_worker_id`) names process ``pid`` on this host."""
    host = worker_id.split(":", 1)[0]
    named_pid = worker_id.rsplit(":", 2)[-2] if worker_id.count(":") >= 3 else ""
    return pid is not None and host == socket.gethostname() and named_pid == str(pid)


class WorkerRuntime:
    """Connections, the engine (GPU workers) and the background threads of one process."""

    def __init__(self, config: _Config) -> None:
        settings = config.settings
        self.config = config
        self.settings = settings
        self.app = config.app
        self.worker_id = new_worker_id(config.entry.name if config.entry else config.role)
        self.store = JobStore.from_url(
            settings.redis_target,
            retention_seconds=settings.job_retention_seconds,
            queue_policy=settings.queue_policy,
        )
        self.storage: Storage = storage_from_settings(settings)
        self.emitter = Emitter(self.store, self.app, self.render)
        self.runner: Any = None
        self.deliverer: Deliverer | None = None
        self._threads: list[Periodic] = []

    def render(self, record: JobRecord) -> dict[str, Any]:
        """The public job object, as the gateway shows it (presigned URLs included)."""
        public = record.to_public(
            base_url=self.settings.public_base_url,
            url_for=self.storage.url,
            url_ttl_seconds=self.settings.presigned_url_ttl_seconds,
            retention_seconds=self.settings.job_retention_seconds,
        )
        return public.model_dump(mode="json")

    # -- GPU worker ------------------------------------------------------------------------

    def start_gpu(self) -> None:
        """Load and warm the engine, then announce the model and start the janitor."""
        from worker.engine_loader import (
            load_engine,
            load_preview_decoder,
            measured_entry,
            warm_up,
        )
        from worker.runner import JobRunner

        declared, source = self.config.entry, self.config.source
        assert declared is not None and source is not None
        engine = load_engine(declared, self.settings, source)
        # From here on the entry is the model as measured; the gateway learns it from the
        # heartbeat and validates new jobs against it.
        entry = measured_entry(declared, engine)
        assert entry.measured is not None
        shape = entry.measured.model_dump_json()
        preview_decoder = load_preview_decoder(entry, self.settings, engine)
        if self.settings.warmup:
            warm_up(engine)
        cache = None
        if self.settings.inversion_cache:
            cache = InversionCache(
                self.storage,
                self.store,
                retention_seconds=self.settings.inversion_cache_retention_seconds,
                max_entries=self.settings.inversion_cache_max_entries,
            )
        self.runner = JobRunner(
            settings=self.settings,
            entry=entry,
            engine=engine,
            store=self.store,
            storage=self.storage,
            app=self.app,
            emitter=self.emitter,
            worker_id=self.worker_id,
            cache=cache,
            preview_decoder=preview_decoder,
        )
        ttl = self.settings.worker_heartbeat_ttl_seconds
        self._threads.append(
            Periodic(
                "worker-heartbeat",
                ttl / 3,
                lambda: self.store.register_worker(entry.name, self.worker_id, ttl, shape),
            ).start()
        )
        self._start_janitor(cache)
        logger.info("worker %s serves %s", self.worker_id, entry.name)

    def run_job(self, job_id: str) -> str:
        if self.runner is None:
            raise RuntimeError("this process has no engine; is it a GPU worker pool process?")
        return self.runner.run(job_id)

    def fail_timed_out(self, job_id: str, worker_pid: int | None) -> None:
        """The hard time limit killed pool child ``worker_pid``: fail the attempt it was running.

        Parent side. Only the child's own attempt is failed, fenced like every other end of a
        job: a later attempt (another worker took over after this one's lease expired) is left
        to finish.
        """
        # Under the queue policy the message's job need not be the one its child ran: look
        # through the running jobs for the child's.
        record = self.store.get(job_id)
        if record is None or not is_local_process(record.worker_id or "", worker_pid):
            record = next(
                (
                    r
                    for r in map(self.store.get, self.store.running_jobs())
                    if r is not None and is_local_process(r.worker_id or "", worker_pid)
                ),
                None,
            )
        if record is None:
            logger.info("job %s: its latest attempt is not the timed-out one; left as is", job_id)
            return
        job_id = record.id
        limit = self.settings.time_limit_seconds
        result = self.store.fail(
            job_id,
            "timeout",
            f"the job ran longer than the hard limit of {limit:g} s and was stopped",
            attempt=record.attempts,
        )
        if result.ok:
            self.emitter.emit_terminal(job_id)
        else:
            logger.info("job %s: timeout not recorded (%s)", job_id, result.outcome)

    # -- webhook worker --------------------------------------------------------------------

    def start_webhooks(self) -> None:
        """Create the deliverer and start the retry scheduler and the janitor."""
        settings = self.settings
        self.deliverer = Deliverer(
            self.store,
            RetryPolicy(
                delays=settings.webhook_retry_delays_seconds,
                max_attempts=settings.webhook_max_attempts,
                max_delay=settings.webhook_retry_max_delay_seconds,
                jitter=settings.webhook_retry_jitter,
            ),
            render=self.render,
            timeout=settings.webhook_timeout_seconds,
            max_response_bytes=settings.webhook_max_response_bytes,
            allow_loopback_http=settings.allow_loopback_http,
        )
        scheduler = RetryScheduler(self.store, self.app)
        self._threads.append(
            Periodic(
                "webhook-retries", settings.webhook_scheduler_interval_seconds, scheduler.run_once
            ).start()
        )
        self._start_janitor(None)
        logger.info("webhook worker %s ready", self.worker_id)

    def deliver_webhook(self, job_id: str, message: dict[str, Any] | None) -> int:
        if self.deliverer is None:
            raise RuntimeError("this process is not a webhook worker")
        if message is None:
            return self.deliverer.drain(job_id)
        return self.deliverer.deliver(job_id, message)

    # -- both ------------------------------------------------------------------------------

    def _start_janitor(self, cache: InversionCache | None) -> None:
        janitor = Janitor(
            self.store, lease_ttl=self.settings.lease_ttl, emitter=self.emitter, cache=cache
        )
        self._threads.append(
            Periodic("janitor", self.settings.janitor_interval, janitor.run_once).start()
        )

    def stop(self) -> None:
        """Stop the threads and withdraw the model from the live registry."""
        for thread in self._threads:
            thread.stop()
        self._threads.clear()
        entry = self.config.entry
        if self.config.role == "gpu" and entry is not None and self.runner is not None:
            try:
                self.store.unregister_worker(entry.name, self.worker_id)
            except Exception as exc:
                logger.warning("could not unregister worker %s: %s", self.worker_id, exc)


# --- signals ----------------------------------------------------------------------------------


@worker_process_init.connect
def _init_pool_process(**_: Any) -> None:
    global _current
    if _config is None or _config.role != "gpu":
        return
    # A fresh runtime per child: the parent's (if any) holds the parent's worker id.
    _current = None
    from worker.engine_loader import ModelShapeMismatch

    try:
        current().start_gpu()
    except ModelShapeMismatch as exc:
        # An operator's mistake, said in one sentence; no traceback to dig it out of.
        logger.critical("the worker cannot serve this model: %s", exc)
        _start_failed.set()
        os.kill(os.getppid(), signal.SIGQUIT)
        raise
    except BaseException:
        logger.critical("the model could not be loaded; stopping the worker", exc_info=True)
        _start_failed.set()
        # Without the model this worker can only fail; a cold shutdown of the parent (exit 1)
        # beats restarting the child forever.
        os.kill(os.getppid(), signal.SIGQUIT)
        raise


@worker_process_shutdown.connect
def _stop_pool_process(**_: Any) -> None:
    if _current is not None and _config is not None and _config.role == "gpu":
        _current.stop()


@worker_ready.connect
def _worker_ready(**_: Any) -> None:
    if _config is not None and _config.role == "webhooks":
        current().start_webhooks()


@worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _current is not None and _config is not None and _config.role == "webhooks":
        _current.stop()
