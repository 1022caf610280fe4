"""Every store operation, written once: what it sends to Redis and how it reads the reply.

Each method here builds a :class:`~masactrl_jobs.store.operation.Call`; the :func:`operation`
decorator makes it a method of both front ends (``JobStore`` and ``AsyncJobStore``), which only
differ in how they run a call. Every state change is one script (or one atomic command), so
nothing a process dies between can leave the job record, its indexes, its queue entry, its event
stream or its webhook bookkeeping in disagreement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from masactrl_jobs.ids import new_id
from masactrl_jobs.schema import JobInput, JobKind, JobStatus, ProgressPhase, WebhookCreate
from masactrl_jobs.store.keys import Keys
from masactrl_jobs.store.operation import Call, operation
from masactrl_jobs.store.records import (
    CancelResult,
    CreateResult,
    FinishResult,
    JobEvent,
    JobRecord,
    ProgressRecord,
    ProgressResult,
    RateLimitResult,
    StartResult,
    text,
)

__all__ = [
    "EVENTS_MAXLEN",
    "PRIORITY_SCALE",
    "STRIDE_UNIT",
    "KEY_TTL_GRACE_SECONDS",
    "JobOperations",
    "compact",
    "due",
    "flag",
    "texts",
]

T = TypeVar("T")
# Aliases for annotations inside JobOperations, where ``list`` names the listing operation.
TextList = list[str]
EventList = list[JobEvent]

# Redis deletes a finished job's keys this long after the sweeper should have: a safety net for a
# deployment that never runs the sweeper, late enough that the sweeper still sees the job id and
# removes the stored results first.
KEY_TTL_GRACE_SECONDS = 24 * 3600
# Events are throttled by the worker (a few per second); this bounds a runaway producer.
EVENTS_MAXLEN = 2000

# A tenant's queue orders by priority, then submission time (ms): score = -priority *
# PRIORITY_SCALE + ms, exact in a double for |priority| <= 100 (schema.PRIORITY_LIMIT).
PRIORITY_SCALE = 10**13
# A tenant's stride is STRIDE_UNIT / weight (as prelude.lua's STRIDE_UNIT): integers keep the
# passes exact.
STRIDE_UNIT = 1_000_000

# Built once: json.dumps with arguments builds a new encoder on every call.
compact = json.JSONEncoder(separators=(",", ":")).encode
_compact_utf8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _strings(values: dict[str, Any]) -> dict[str, str]:
    """Hash fields as strings (JSON for structures); None values are left out."""
    return {
        key: value if isinstance(value, str) else compact(value)
        for key, value in values.items()
        if value is not None
    }


def _warnings(warnings: Sequence[str]) -> list[str] | None:
    # Only a job with warnings stores the field (None values are left out of the hash).
    return list(warnings) or None


def _pairs(values: dict[str, Any]) -> list[str]:
    return [item for pair in _strings(values).items() for item in pair]


def _flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def texts(reply: Any) -> list[str]:
    return [text(x) for x in reply or []]


def flag(reply: Any) -> bool:
    return bool(int(reply))


def _parse_events(reply: Any) -> list[JobEvent]:
    """Events of an XREAD reply (one stream, or none when the wait timed out)."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    return [event for _name, entries in streams for event in _parse_entries(entries)]


def _parse_entries(entries: Any) -> list[JobEvent]:
    events = []
    for entry_id, fields in entries or []:
        f = {text(k): text(v) for k, v in fields.items()}
        events.append(JobEvent(text(entry_id), f.get("event", ""), json.loads(f.get("data", "{}"))))
    return events


def due(index: str, now: float | None, limit: int) -> Call[list[str]]:
    """Up to ``limit`` members of a sorted set whose score (a Unix time) is ``now`` or earlier."""
    now = time.time() if now is None else now
    return Call(None, (), ["ZRANGEBYSCORE", index, "-inf", now, "LIMIT", 0, int(limit)], texts)


def nothing(value: T) -> Call[T]:
    """A call that needs no round trip (an operation on an empty list)."""
    return Call(None, (), (), lambda _: value)


class JobOperations:
    """The operations on jobs: submission, reads, transitions, events, limits and retention."""

    keys: Keys
    retention_seconds: int
    events_maxlen: int
    # "fair" (the queue policy: fair share, then priority) or "fifo" (Celery's delivery order).
    queue_policy: str

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        allowed_from: Iterable[JobStatus],
        fields: dict[str, Any],
        event: dict[str, Any],
        now: float | None,
        attempt: int | None,
    ) -> Call[FinishResult]:
        k = self.keys
        now = time.time() if now is None else now
        allowed = "," + ",".join(s.value for s in allowed_from) + ","
        args = [
            status.value,
            allowed,
            repr(now),
            now + self.retention_seconds,
            self.retention_seconds + KEY_TTL_GRACE_SECONDS,
            self.retention_seconds,
            compact({"status": status.value, **event}),
            self.events_maxlen,
            k.queue_prefix,
            "" if attempt is None else str(attempt),
            *_pairs(fields),
        ]
        keys = [k.job(job_id), k.events(job_id), k.running, k.expiry, k.lease(job_id)]
        return Call(
            "finish",
            keys,
            args,
            lambda r: FinishResult(text(r[0]), text(r[1]) or None),
            durable=True,
        )

    @operation
    def ping(self) -> Call[bool]:
        """Whether Redis answers (raises redis.ConnectionError when it is unreachable)."""
        return Call(None, (), ["PING"], lambda r: True)

    # -- jobs ------------------------------------------------------------------------------

    @operation
    def create(
        self,
        *,
        tenant: str,
        kind: JobKind,
        model: str,
        input: JobInput,
        request_hash: str = "",
        idempotency_key: str | None = None,
        max_queue_depth: int = 0,
        webhook: WebhookCreate | None = None,
        webhook_secrets: Sequence[str] = (),
        job_id: str | None = None,
        now: float | None = None,
        message: tuple[str, str] | None = None,
        rate_limit: tuple[float, float] | None = None,
        priority: int = 0,
        weight: float = 1.0,
        deadline_at: float | None = None,
        retry_of: str | None = None,
    ) -> Call[CreateResult]:
        """Record a queued job, atomically with its idempotency record and queue-depth check.

        ``message`` (broker list, message text; see ``queue.TaskMessages``) is pushed in the same
        step; ``rate_limit`` (rate, burst) takes a token from the tenant's bucket first.
        ``priority`` orders it within the tenant's queue, ``weight`` is the tenant's share
        against other tenants, ``deadline_at`` (Unix seconds) is when it expires unless started.
        ``retry_of`` makes it the retry of that ended job (failed, canceled or expired, not
        retried before), linked both ways in the same step.
        """
        k = self.keys
        job_id = job_id or new_id()
        now = time.time() if now is None else now
        idem_key = k.idempotency(tenant, idempotency_key) if idempotency_key else ""
        input_json = input.model_dump_json()
        record = JobRecord(
            id=job_id,
            tenant=tenant,
            kind=kind,
            model=model,
            status=JobStatus.queued,
            created_at=now,
            input=input,
            webhook=webhook.model_dump(mode="json") if webhook else None,
            webhook_secrets=list(webhook_secrets) if webhook else [],
            request_hash=request_hash,
            input_json=input_json,
            priority=int(priority),
            deadline_at=deadline_at,
            retry_of=retry_of,
        )
        fields = _strings(
            {
                "id": job_id,
                "tenant": tenant,
                "kind": kind.value,
                "model": model,
                "status": JobStatus.queued.value,
                "created_at": repr(now),
                "input": input_json,
                "attempts": "0",
                "webhook": record.webhook,
                "webhook_secrets": record.webhook_secrets or None,
                "request_hash": request_hash,
                "idem_key": idem_key or None,
                "priority": str(int(priority)) if priority else None,
                "deadline_at": repr(deadline_at) if deadline_at is not None else None,
                "retry_of": retry_of,
            }
        )
        input_keys = record.input_keys
        expire_at = now + self.retention_seconds
        # Few, large arguments (see create.lua): packing each costs more than cjson in Redis.
        args = [
            job_id,
            int(now * 1000),
            max(int(max_queue_depth), 0),
            "1" if idem_key else "0",
            request_hash,
            self.retention_seconds,
            expire_at,
            '{"status":"queued"}',
            self.events_maxlen,
            message[1] if message else "",
            rate_limit[0] if rate_limit else "",
            rate_limit[1] if rate_limit else "",
            expire_at,
            compact(input_keys) if input_keys else "[]",
            _compact_utf8(fields),
            tenant,
            -int(priority) * PRIORITY_SCALE + int(now * 1000),
            max(1, round(STRIDE_UNIT / weight)),
            "" if deadline_at is None else repr(deadline_at),
            retry_of or "",
            k.queue_prefix,
            model,
            self.queue_policy,
        ]
        keys = [
            k.job(job_id),
            k.events(job_id),
            k.tenant_jobs(tenant),
            k.queue(model),
            k.expiry,
            k.inputs,
            idem_key or k.idempotency(tenant, ""),
            # The broker list is Celery's (kombu's Redis transport), named after the queue.
            message[0] if message else k.queue(model),
            k.rate_limit(tenant),
            k.job(retry_of or ""),
        ]

        def parse(reply: Any) -> CreateResult:
            outcome, value = text(reply[0]), text(reply[1])
            if outcome == "missing":
                return CreateResult("missing")
            if outcome == "not_retryable":
                return CreateResult("not_retryable", previous=value)
            if outcome == "retried":
                return CreateResult("retried", job_id=value)
            if outcome == "duplicate":
                body_hash, _, original = value.partition(" ")
                return CreateResult("duplicate", job_id=original, request_hash=body_hash)
            if outcome == "full":
                return CreateResult("full")
            if outcome == "rate_limited":
                return CreateResult("rate_limited", retry_after=float(value))
            record.queue_position = int(value) + 1
            return CreateResult("created", job_id=job_id, request_hash=request_hash, record=record)

        return Call("create", keys, args, parse, durable=True)

    @operation
    def get(self, job_id: str) -> Call[JobRecord | None]:
        """The job, or None when it does not exist (or has expired)."""

        def parse(reply: Any) -> JobRecord | None:
            if not reply:
                return None
            return JobRecord.from_hash(_flat_to_dict(reply[0]), int(reply[1]))

        args = [self.keys.queue_prefix, self.queue_policy]
        return Call("get", [self.keys.job(job_id)], args, parse)

    @operation
    def list(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> Call[tuple[list[JobRecord], str | None]]:
        """A tenant's jobs, newest first, and the cursor of the next page (None at the end)."""

        def parse(reply: Any) -> tuple[list[JobRecord], str | None]:
            cursor_out = text(reply[0]) or None
            records = [JobRecord.from_hash(_flat_to_dict(h), int(r)) for h, r in reply[1:]]
            return records, cursor_out

        args = [
            cursor or "",
            max(1, int(limit)),
            status.value if status else "",
            # Bounds the work a filtered listing does per call; the cursor carries on from there.
            max(1000, int(limit) * 10),
            self.keys.job_prefix,
            self.keys.queue_prefix,
            self.queue_policy,
        ]
        return Call("list", [self.keys.tenant_jobs(tenant)], args, parse)

    @operation
    def cancel(self, job_id: str, now: float | None = None) -> Call[CancelResult]:
        """Cancel a queued job at once, or flag a running one for its worker."""
        k = self.keys
        now = time.time() if now is None else now
        args = [
            repr(now),
            now + self.retention_seconds,
            self.retention_seconds + KEY_TTL_GRACE_SECONDS,
            self.retention_seconds,
            '{"status":"canceled"}',
            self.events_maxlen,
            k.queue_prefix,
        ]
        keys = [k.job(job_id), k.events(job_id), k.running, k.expiry, k.lease(job_id)]
        return Call(
            "cancel",
            keys,
            args,
            lambda r: CancelResult(text(r[0]), text(r[1]) or None),
            durable=True,
        )

    @operation
    def start(self, job_id: str, worker_id: str, now: float | None = None) -> Call[StartResult]:
        """queued (or running with an expired lease) -> running, counting the attempt."""
        k = self.keys
        now = time.time() if now is None else now

        def parse(reply: Any) -> StartResult:
            outcome, value = text(reply[0]), text(reply[1])
            if outcome == "started":
                return StartResult(outcome, attempts=int(value), status="running")
            return StartResult(outcome, status=value or None)

        args = [repr(now), int(now * 1000), worker_id, self.events_maxlen, k.queue_prefix]
        keys = [k.job(job_id), k.events(job_id), k.running, k.taken]
        return Call("start", keys, args, parse, durable=True)

    @operation
    def progress(
        self, job_id: str, phase: str, step: int, total: int, frames_done: int | None = None
    ) -> Call[ProgressResult]:
        """Record progress of a running job; also says whether cancellation was requested."""
        data = ProgressRecord(
            ProgressPhase(phase), int(step), max(int(total), 1), frames_done
        ).to_json()
        return Call(
            "progress",
            [self.keys.job(job_id), self.keys.events(job_id)],
            [compact(data), self.events_maxlen],
            lambda r: ProgressResult(flag(r[0]), flag(r[1])),
        )

    @operation
    def succeed(
        self,
        job_id: str,
        images: Sequence[dict[str, Any]],
        metrics: dict[str, Any] | None = None,
        now: float | None = None,
        *,
        attempt: int | None = None,
        warnings: Sequence[str] = (),
    ) -> Call[FinishResult]:
        """running -> succeeded with output images ``{role, prompt, key, width, height}``.

        ``attempt`` fences the change: it happens only while that attempt is the job's latest
        (``fenced`` otherwise). Workers always pass it; None is for tools and tests.
        ``warnings`` (sentences about the input, e.g. words the model does not know) are kept
        with the job, as they are with :meth:`fail` and :meth:`finish_canceled`.
        """
        fields = {
            "output": {"images": list(images)},
            "metrics": metrics,
            "warnings": _warnings(warnings),
        }
        status, allowed = JobStatus.succeeded, [JobStatus.running]
        return self._finish(job_id, status, allowed, fields, {}, now, attempt)

    @operation
    def fail(
        self,
        job_id: str,
        code: str,
        message: str,
        metrics: dict[str, Any] | None = None,
        now: float | None = None,
        *,
        attempt: int | None = None,
        warnings: Sequence[str] = (),
    ) -> Call[FinishResult]:
        """queued|running -> failed with ``{code, message}``, fenced by ``attempt`` (see
        :meth:`succeed`)."""
        error = {"code": code, "message": message}
        allowed = [JobStatus.queued, JobStatus.running]
        fields = {"error": error, "metrics": metrics, "warnings": _warnings(warnings)}
        event = {"error": error}
        return self._finish(job_id, JobStatus.failed, allowed, fields, event, now, attempt)

    @operation
    def finish_canceled(
        self,
        job_id: str,
        metrics: dict[str, Any] | None = None,
        now: float | None = None,
        *,
        attempt: int | None = None,
        warnings: Sequence[str] = (),
    ) -> Call[FinishResult]:
        """running -> canceled, for the worker that stopped on the cancel flag (fenced by
        ``attempt``, see :meth:`succeed`)."""
        fields = {"metrics": metrics, "warnings": _warnings(warnings)}
        status, allowed = JobStatus.canceled, [JobStatus.running]
        return self._finish(job_id, status, allowed, fields, {}, now, attempt)

    @operation
    def cancel_requested(self, job_id: str) -> Call[bool]:
        """Whether a client asked to cancel this (running) job."""
        args = ["HGET", self.keys.job(job_id), "cancel_requested"]
        return Call(None, (), args, lambda r: r is not None and text(r) == "1")

    @operation
    def read_events(self, job_id: str, after: str = "0", count: int = 100) -> Call[EventList]:
        """Events after the stream id ``after`` ("0" = from the start), without blocking."""
        start = f"({after}" if after != "0" else "-"
        args = ["XRANGE", self.keys.events(job_id), start, "+", "COUNT", count]
        return Call(None, (), args, _parse_entries)

    @operation
    def wait_events(
        self, job_id: str, after: str = "$", block_ms: int = 1000, count: int = 100
    ) -> Call[EventList]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one ("$" = new only)."""
        args = ["XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", self.keys.events(job_id)]
        return Call(None, (), [*args, after], _parse_events)

    @operation
    def record_delivery(self, job_id: str, delivery: dict[str, Any]) -> Call[bool]:
        """Append one webhook delivery attempt ``{event, attempt, at, status_code, error,
        duration_ms}`` to the job; False when the job no longer exists."""
        return Call("delivery", [self.keys.job(job_id)], [compact(delivery)], flag)

    # -- limits and queues -----------------------------------------------------------------

    @operation
    def rate_limit(
        self, tenant: str, rate: float, burst: float, cost: float = 1
    ) -> Call[RateLimitResult]:
        """Take ``cost`` tokens from the tenant's bucket (``rate`` per second, up to ``burst``)."""
        return Call(
            "rate_limit",
            [self.keys.rate_limit(tenant)],
            [rate, burst, cost],
            lambda r: RateLimitResult(flag(r[0]), float(text(r[1])), float(text(r[2]))),
        )

    @operation
    def queue_depths(self, models: Sequence[str]) -> Call[dict[str, int]]:
        """Queued jobs per model."""
        models = list(models)
        return Call(
            "depths",
            [self.keys.queue(m) for m in models],
            [],
            lambda r: {m: int(n) for m, n in zip(models, r or [], strict=True)},
        )

    @operation
    def queue_census(
        self, models: Sequence[str]
    ) -> Call[tuple[dict[tuple[str, str, int], int], dict[str, int]]]:
        """For the metrics: queued jobs by (model, tenant, priority), and jobs expired so far
        by model."""
        models = list(models)
        if not models:
            return nothing(({}, {}))

        def parse(reply: Any) -> tuple[dict[tuple[str, str, int], int], dict[str, int]]:
            queued = {(text(m), text(t), int(text(p))): int(n) for m, t, p, n in reply[0]}
            return queued, {text(m): int(n) for m, n in reply[1]}

        args = [self.keys.queue_prefix, PRIORITY_SCALE, *models]
        return Call("queued", [], args, parse)

    @operation
    def idempotency(self, tenant: str, key: str) -> Call[tuple[str, str] | None]:
        """``(request hash, job id)`` recorded for this tenant's Idempotency-Key, if any."""

        def parse(reply: Any) -> tuple[str, str] | None:
            if not reply:
                return None
            body_hash, _, job_id = text(reply).partition(" ")
            return body_hash, job_id

        return Call(None, (), ["GET", self.keys.idempotency(tenant, key)], parse)

    # -- retention -------------------------------------------------------------------------

    @operation
    def expired_jobs(self, now: float | None = None, limit: int = 100) -> Call[TextList]:
        """Jobs past retention; delete their ``results/<id>/`` then call :meth:`purge_jobs`."""
        return due(self.keys.expiry, now, limit)

    @operation
    def purge_jobs(self, job_ids: Sequence[str]) -> Call[int]:
        """Remove every Redis trace of the jobs."""
        if not job_ids:
            return nothing(0)
        keys = [self.keys.expiry, self.keys.running]
        return Call("purge", keys, [self.keys.prefix, *job_ids], int)

    @operation
    def expired_inputs(self, now: float | None = None, limit: int = 100) -> Call[TextList]:
        """Input keys no job has used within retention."""
        return due(self.keys.inputs, now, limit)

    @operation
    def register_inputs(self, keys: Sequence[str], now: float | None = None) -> Call[int]:
        """Schedule input keys for removal a retention period from ``now``, before storing them.

        Registered first, an object whose job is then refused (a queue that filled meanwhile)
        is still swept. ``GT`` never shortens a later removal time another job set for the same
        content-addressed key; ``create`` registers its inputs the same way.
        """
        keys = list(dict.fromkeys(keys))
        if not keys:
            return nothing(0)
        expire_at = (time.time() if now is None else now) + self.retention_seconds
        pairs = [item for key in keys for item in (expire_at, key)]
        return Call(None, (), ["ZADD", self.keys.inputs, "GT", *pairs], int)

    @operation
    def forget_inputs(self, keys: Sequence[str], now: float | None = None) -> Call[TextList]:
        """Drop the still-expired keys from the index and return them (delete those objects)."""
        if not keys:
            return nothing([])
        now = time.time() if now is None else now
        return Call("forget_inputs", [self.keys.inputs], [now, *keys], texts)
