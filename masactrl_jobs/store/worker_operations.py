"""The operations only workers use: leases, the worker registry, the janitor's notes and
requeues, the webhook outbox and retry schedule, and the inversion-cache index.

Like the job operations, each is written once (see ``operation.py``) and each state change is
one script or one atomic command, so workers never talk to Redis around the store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from masactrl_jobs.store.keys import Keys
from masactrl_jobs.store.operation import Call, operation
from masactrl_jobs.store.operations import KEY_TTL_GRACE_SECONDS, compact, flag, nothing, texts
from masactrl_jobs.store.records import ClaimResult, PreviewRecord, ProgressResult, text

__all__ = ["WEBHOOK_BOOKKEEPING_TTL_SECONDS", "WEBHOOK_CLAIM_SECONDS", "WorkerOperations"]

# Redis deletes a job's webhook bookkeeping this long after its last event; deliveries past this
# are over anyway (the longest retry schedule is hours).
WEBHOOK_BOOKKEEPING_TTL_SECONDS = 3 * 24 * 3600
# A due webhook retry handed to a scheduler comes due again after this unless the scheduler
# confirms the broker took it (see claim_due_webhooks.lua).
WEBHOOK_CLAIM_SECONDS = 60.0


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# A lease or lock is a key holding its owner's token, with a TTL: taken only when free, renewed
# and dropped only by its owner.
def _take(key: str, token: str, ttl: float) -> Call[bool]:
    return Call(None, (), ["SET", key, token, "NX", "PX", _ms(ttl)], bool)


def _renew(key: str, token: str, ttl: float) -> Call[bool]:
    return Call("renew_if_owner", [key], [token, _ms(ttl)], flag)


def _drop(key: str, token: str) -> Call[bool]:
    return Call("delete_if_owner", [key], [token], flag)


class WorkerOperations:
    """Operations of GPU and webhook workers."""

    keys: Keys
    events_maxlen: int
    retention_seconds: int
    queue_policy: str

    def _end_args(self, now: float) -> list[Any]:
        """What ending a job as a script argument list needs: when its record goes (retention)."""
        return [
            now + self.retention_seconds,
            self.retention_seconds + KEY_TTL_GRACE_SECONDS,
            self.retention_seconds,
        ]

    # -- the queue policy --------------------------------------------------------------------

    @operation
    def claim(
        self,
        message_job: str,
        model: str,
        worker_id: str,
        lease_ttl: float,
        now: float | None = None,
    ) -> Call[ClaimResult]:
        """Decide which job the ``run_job`` message naming ``message_job`` starts on a worker of
        ``model``, and start it with this worker's lease, in one step (``claim.lua``).

        FIFO policy: the named job itself. Fair policy: the message is one start for the model
        and the job is the queue policy's head (fair share between tenants, then priority, then
        submission order). Queued jobs past their deadline end ``expired`` on the way.
        """
        now = time.time() if now is None else now
        k = self.keys
        args = [
            message_job,
            model,
            worker_id,
            _ms(lease_ttl),
            repr(now),
            _ms(now),
            self.events_maxlen,
            k.job_prefix,
            k.queue_prefix,
            self.queue_policy,
            *self._end_args(now),
        ]

        def parse(reply: Any) -> ClaimResult:
            ended = tuple(texts(reply[3]))
            outcome = text(reply[0])
            if outcome != "started":
                return ClaimResult(outcome, text(reply[1]) or None, ended=ended)
            return ClaimResult("started", text(reply[1]), int(reply[2]), ended)

        keys = [k.running, k.taken, k.expiry]
        return Call("claim", keys, args, parse, durable=True)

    @operation
    def expire_due(
        self, models: Sequence[str], now: float | None = None, limit: int = 100
    ) -> Call[list[str]]:
        """End the queued jobs of ``models`` past their deadline as ``expired``; their ids (each
        is returned by the one call that ended it: send its webhook)."""
        models = list(models)
        if not models:
            return nothing([])
        now = time.time() if now is None else now
        k = self.keys
        args = [
            repr(now),
            int(limit),
            k.job_prefix,
            k.queue_prefix,
            *self._end_args(now),
            self.events_maxlen,
            *models,
        ]
        return Call("expire", [k.running, k.expiry], args, texts, durable=True)

    @operation
    def running_jobs(self, limit: int = 1000) -> Call[list[str]]:
        """Ids of running jobs, longest running first."""
        return Call(None, (), ["ZRANGE", self.keys.running, 0, int(limit) - 1], texts)

    # -- live previews -----------------------------------------------------------------------

    @operation
    def preview(self, job_id: str, preview: PreviewRecord) -> Call[ProgressResult]:
        """Record a running job's latest live preview and add it to its events (a ``preview``
        event); like ``progress``, also says whether cancellation was requested."""
        return Call(
            "preview",
            [self.keys.job(job_id), self.keys.events(job_id)],
            [compact(preview.to_json()), self.events_maxlen],
            lambda r: ProgressResult(flag(r[0]), flag(r[1])),
        )

    # -- leases ----------------------------------------------------------------------------

    @operation
    def acquire_lease(self, job_id: str, worker_id: str, ttl: float) -> Call[bool]:
        """Take the job's lease for ``ttl`` seconds; False when another worker holds it."""
        return _take(self.keys.lease(job_id), worker_id, ttl)

    @operation
    def renew_lease(self, job_id: str, worker_id: str, ttl: float, attempt: int) -> Call[bool]:
        """Extend our lease; False when another worker took it or started the job (stop).

        A lease that lapsed while Redis was unreachable is taken back when ``attempt`` is still
        the job's running attempt: nobody else started it, so the run may go on.
        """
        keys = [self.keys.lease(job_id), self.keys.job(job_id)]
        return Call("renew_lease", keys, [worker_id, _ms(ttl), str(attempt)], flag)

    @operation
    def release_lease(self, job_id: str, worker_id: str) -> Call[bool]:
        """Drop our lease (a terminal transition also drops it)."""
        return _drop(self.keys.lease(job_id), worker_id)

    # -- the janitor -----------------------------------------------------------------------

    @operation
    def take(self, job_id: str, now: float | None = None) -> Call[bool]:
        """Note that a worker took the job's message (before :meth:`claim` decides what it
        starts, which clears the note).

        A worker that dies before starting the job leaves it ``queued`` with its message
        unacknowledged until the broker's visibility timeout (an hour); the note lets the
        janitor recover it within a lease lifetime instead. Starting the job clears it.
        """
        now = time.time() if now is None else now
        return Call(None, (), ["ZADD", self.keys.taken, _ms(now), job_id], lambda r: True)

    @operation
    def untake(self, job_id: str) -> Call[bool]:
        """Clear the note of :meth:`take` for a message dropped without starting the job."""
        return Call(None, (), ["ZREM", self.keys.taken, job_id], flag)

    @operation
    def stale_jobs(
        self, older_than: float, limit: int = 1000, now: float | None = None
    ) -> Call[list[str]]:
        """Jobs started or taken over ``older_than`` s ago whose lease is gone (worker lost)."""
        now = time.time() if now is None else now
        args = [_ms(now - older_than), int(limit), self.keys.job_prefix]
        return Call("stale", [self.keys.running, self.keys.taken], args, texts)

    @operation
    def requeue(
        self,
        job_id: str,
        older_than: float,
        message: tuple[str, str],
        now: float | None = None,
    ) -> Call[int | None]:
        """Put a job whose worker is gone back at the head of its queue; its attempts so far, or
        None.

        One step: status ``queued`` with queue position 1, a ``requeued`` event and the broker
        ``message`` (list, text; see ``queue.TaskMessages``) pushed where workers take the next
        one, so the position it reports is the order it runs in. None when there is nothing
        to do: another janitor did it, a worker holds the lease, or the job ended or moved on.
        """
        now = time.time() if now is None else now
        k = self.keys
        keys = [k.job(job_id), k.events(job_id), k.lease(job_id), k.running, k.taken, message[0]]
        args = [
            job_id,
            _ms(now - older_than),
            k.queue_prefix,
            self.events_maxlen,
            message[1],
            self.queue_policy,
        ]
        return Call("requeue", keys, args, lambda r: int(text(r[0])) if r else None, durable=True)

    # -- the worker registry ---------------------------------------------------------------

    @operation
    def register_worker(
        self, model: str, worker_id: str, ttl: float, shape: str | None = None
    ) -> Call[bool]:
        """Heartbeat: the worker serves ``model`` for the next ``ttl`` seconds, and its loaded
        model measures ``shape`` (``ModelShape`` JSON; the gateway validates against it)."""
        keys = [self.keys.workers(model), self.keys.worker_models, self.keys.model_shape(model)]
        args = [worker_id, time.time() + ttl, model, shape or "", _ms(ttl)]
        return Call("register", keys, args, lambda r: True)

    @operation
    def unregister_worker(self, model: str, worker_id: str) -> Call[bool]:
        """Remove the worker at a clean shutdown."""
        return Call(None, (), ["ZREM", self.keys.workers(model), worker_id], flag)

    @operation
    def worker_models(self) -> Call[set[str]]:
        """Models that ever had a worker (whether or not one is live now)."""
        return Call(None, (), ["SMEMBERS", self.keys.worker_models], lambda r: set(texts(r)))

    @operation
    def live_models(self) -> Call[set[str]]:
        """Models with at least one worker whose heartbeat has not lapsed."""
        args = [self.keys.workers_prefix, time.time()]
        return Call("live_models", [self.keys.worker_models], args, lambda r: set(texts(r)))

    @operation
    def model_shapes(self, models: Sequence[str]) -> Call[dict[str, str]]:
        """The shape JSON the live workers of each model reported (absent: none reported, or
        their heartbeats lapsed)."""
        names = list(models)

        def parse(reply: Any) -> dict[str, str]:
            return {n: text(v) for n, v in zip(names, reply or [], strict=False) if v is not None}

        if not names:
            return nothing({})
        return Call(None, (), ["MGET", *(self.keys.model_shape(n) for n in names)], parse)

    @operation
    def live_workers(self, model: str) -> Call[set[str]]:
        """Ids of the workers serving ``model`` whose heartbeat has not lapsed."""
        args = ["ZRANGEBYSCORE", self.keys.workers(model), time.time(), "+inf"]
        return Call(None, (), args, lambda r: set(texts(r)))

    # -- webhooks --------------------------------------------------------------------------

    @operation
    def push_webhook(self, job_id: str, message: dict[str, Any]) -> Call[bool]:
        """Append an event to the job's webhook outbox (first attempts go out in this order)."""
        keys = [self.keys.webhook_outbox(job_id)]
        args = [compact(message), WEBHOOK_BOOKKEEPING_TTL_SECONDS]
        return Call("push_webhook", keys, args, flag)

    @operation
    def peek_webhooks(self, job_id: str, count: int = 2) -> Call[list[str]]:
        """The first ``count`` messages (JSON) of the job's outbox, oldest first."""
        args = ["LRANGE", self.keys.webhook_outbox(job_id), 0, count - 1]
        return Call(None, (), args, texts)

    @operation
    def pop_webhook(self, job_id: str) -> Call[bool]:
        """Remove the oldest message of the job's outbox, once its attempt was made."""
        return Call(None, (), ["LPOP", self.keys.webhook_outbox(job_id)], lambda r: r is not None)

    @operation
    def webhook_backlog(self, job_id: str) -> Call[int]:
        """How many messages wait in the job's outbox."""
        return Call(None, (), ["LLEN", self.keys.webhook_outbox(job_id)], int)

    @operation
    def lock_webhooks(self, job_id: str, token: str, ttl: float) -> Call[bool]:
        """Become the one drainer of the job's outbox for ``ttl`` seconds; False when taken."""
        return _take(self.keys.webhook_lock(job_id), token, ttl)

    @operation
    def renew_webhook_lock(self, job_id: str, token: str, ttl: float) -> Call[bool]:
        """Extend the drain lock we hold; False when it lapsed."""
        return _renew(self.keys.webhook_lock(job_id), token, ttl)

    @operation
    def unlock_webhooks(self, job_id: str, token: str) -> Call[bool]:
        """Let go of the drain lock, if it is still ours."""
        return _drop(self.keys.webhook_lock(job_id), token)

    @operation
    def webhook_sent(self, job_id: str, message_id: str) -> Call[bool]:
        """Whether the first attempt of ``message_id`` was already made."""
        args = ["SISMEMBER", self.keys.webhook_sent(job_id), message_id]
        return Call(None, (), args, flag)

    @operation
    def mark_webhook_sent(self, job_id: str, message_id: str) -> Call[bool]:
        """Remember that the first attempt of ``message_id`` was made."""
        keys = [self.keys.webhook_sent(job_id)]
        args = [message_id, WEBHOOK_BOOKKEEPING_TTL_SECONDS]
        return Call("mark_webhook_sent", keys, args, flag)

    @operation
    def schedule_webhook(self, retry: dict[str, Any], due: float) -> Call[bool]:
        """Park a webhook retry until ``due`` (a Unix time)."""
        args = ["ZADD", self.keys.webhook_schedule, due, compact(retry)]
        return Call(None, (), args, flag)

    @operation
    def claim_due_webhooks(self, limit: int = 100, now: float | None = None) -> Call[list[str]]:
        """Retries (JSON) that are due, each claimed for one scheduler.

        Call :meth:`forget_webhooks` once the broker has them; an unconfirmed claim comes due
        again after a minute, so a crash repeats a retry rather than losing it.
        """
        now = time.time() if now is None else now
        args = [now, int(limit), now + WEBHOOK_CLAIM_SECONDS]
        return Call("claim_due_webhooks", [self.keys.webhook_schedule], args, texts)

    @operation
    def forget_webhooks(self, retries: Sequence[str]) -> Call[int]:
        """Remove claimed retries (as returned by :meth:`claim_due_webhooks`) from the schedule."""
        if not retries:
            return nothing(0)
        return Call(None, (), ["ZREM", self.keys.webhook_schedule, *retries], int)

    # -- the inversion cache ---------------------------------------------------------------

    @operation
    def touch_inversion(self, key: str, now: float | None = None) -> Call[bool]:
        """Record a use of the cached inversion at storage ``key``."""
        now = time.time() if now is None else now
        return Call(None, (), ["ZADD", self.keys.inversion_cache, now, key], lambda r: True)

    @operation
    def stale_inversions(
        self, unused_since: float, max_entries: int, limit: int = 500
    ) -> Call[list[str]]:
        """Cached inversions to delete: unused since ``unused_since``, then the least recently
        used beyond ``max_entries``."""
        args = [unused_since, int(limit), int(max_entries)]
        return Call("inversion_sweep", [self.keys.inversion_cache], args, texts)

    @operation
    def forget_inversion(self, key: str) -> Call[bool]:
        """Drop a deleted inversion from the index."""
        return Call(None, (), ["ZREM", self.keys.inversion_cache, key], flag)
