"""Signed webhooks (Standard Webhooks): emitting job events and delivering them.

Flow::

    GPU worker                      Redis                                 webhook worker
    emit(job, "job.started") --RPUSH--> job:<id>:webhook:outbox
                           --send_task deliver_webhook(job_id)-->  drain(job_id): one at a time
                                                                   per job, in order, first tries
                               webhooks:scheduled (zset by due)  <-- failed tries, with a delay
                                   --RetryScheduler moves due ones-->  deliver_webhook(job_id, msg)

First attempts of a job's events go out in the order they happened (one drainer per job holds a
short lock); retries are independent, so one failing event never holds back the others for hours.
Delays live in Redis, not in the broker: a Celery countdown would sit unacknowledged in a worker's
memory and, with the Redis transport, be redelivered after the visibility timeout.

Each event has a deterministic ``webhook-id`` (job id + event), so a receiver can drop duplicates,
and a first attempt of an id already delivered is skipped. Headers and body follow Standard
Webhooks: ``webhook-id``, ``webhook-timestamp`` (of the attempt, so retries pass the receiver's
freshness check), ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, one per
tenant secret, space-separated during a rotation), body ``{"type", "timestamp", "data": <job>}``.

Nothing here imports torch: the delivery worker runs in the gateway image.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import certifi
from celery import Celery
from standardwebhooks import Webhook

from masactrl_jobs import netguard
from masactrl_jobs.queue import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE
from masactrl_jobs.schema import JobStatus, WebhookEvent
from masactrl_jobs.store import JobRecord, JobStore

__all__ = [
    "EVENT_FILTER",
    "Deliverer",
    "Emitter",
    "RetryPolicy",
    "RetryScheduler",
    "build_body",
    "event_type_for",
    "sign",
]

logger = logging.getLogger(__name__)

# Which subscription (`webhook.events` of the job) each event type belongs to.
EVENT_FILTER: dict[str, WebhookEvent] = {
    "job.started": WebhookEvent.started,
    # A requeued job will start again: it goes to those who follow starts, so adding it needed
    # no new subscription value.
    "job.requeued": WebhookEvent.started,
    "job.progress": WebhookEvent.progress,
    "job.succeeded": WebhookEvent.completed,
    "job.failed": WebhookEvent.completed,
    "job.canceled": WebhookEvent.completed,
    "job.expired": WebhookEvent.completed,
}


def event_type_for(status: JobStatus) -> str:
    """The webhook type of a terminal status (``job.succeeded`` for ``succeeded``)."""
    return f"job.{status.value}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def build_body(event_type: str, timestamp: str, data: dict[str, Any]) -> bytes:
    """The exact bytes that are signed and sent."""
    body = {"type": event_type, "timestamp": timestamp, "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: one ``v1,<base64>`` per secret (newest first), space-separated."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    text = body.decode()
    return " ".join(Webhook(secret).sign(msg_id, moment, text) for secret in secrets_)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed delivery again."""

    delays: Sequence[float]
    max_attempts: int
    max_delay: float
    jitter: float = 0.1

    def delay_after(self, attempt: int, rand: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); None: give up."""
        if attempt >= self.max_attempts:
            return None
        index = attempt - 1
        if index < len(self.delays):
            base = self.delays[index]
        else:
            # Past the schedule each wait doubles the last one, up to the cap.
            base = self.delays[-1] * 2 ** (index - len(self.delays) + 1)
        base = min(base, self.max_delay)
        # Jitter spreads the retries of many jobs that failed together (a receiver outage).
        return min(base * (1 + self.jitter * rand()), self.max_delay)


def _message_id(job_id: str, event_type: str, suffix: str = "") -> str:
    name = event_type.removeprefix("job.")
    return f"msg_{job_id}_{name}{'_' + suffix if suffix else ''}"


class Emitter:
    """Queues a job's events for delivery (used by GPU workers; cheap, never raises)."""

    def __init__(
        self, store: JobStore, app: Celery, render: Callable[[JobRecord], dict[str, Any]]
    ) -> None:
        self.store = store
        self.app = app
        self.render = render

    def emit(self, record: JobRecord, event_type: str, *, suffix: str = "") -> bool:
        """Queue ``event_type`` with a snapshot of ``record`` if the job subscribed to it."""
        webhook = record.webhook
        if not webhook or EVENT_FILTER[event_type].value not in webhook.get("events", []):
            return False
        message = {
            "id": _message_id(record.id, event_type, suffix),
            "type": event_type,
            "timestamp": _iso(time.time()),
            "data": self.render(record),
        }
        try:
            self.store.push_webhook(record.id, message)
            self.app.send_task(DELIVER_WEBHOOK_TASK, args=[record.id], queue=WEBHOOK_QUEUE)
        except Exception as exc:
            # A webhook must never fail a job; the event is lost, the job record is not.
            logger.warning("could not queue %s for job %s: %s", event_type, record.id, exc)
            return False
        return True

    def emit_terminal(self, job_id: str) -> bool:
        """Queue the terminal event of a job that just ended (re-read for its final state)."""
        try:
            record = self.store.get(job_id)
        except Exception as exc:
            logger.warning("could not read job %s for its webhook: %s", job_id, exc)
            return False
        if record is None or not record.status.is_terminal():
            return False
        return self.emit(record, event_type_for(record.status))


@dataclass
class _Attempt:
    status_code: int | None
    error: str | None
    duration: float
    retry: bool

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Deliverer:
    """Delivers events: ordered first attempts per job, then retries on a schedule."""

    def __init__(
        self,
        store: JobStore,
        policy: RetryPolicy,
        *,
        render: Callable[[JobRecord], dict[str, Any]],
        timeout: float = 15.0,
        max_response_bytes: int = 4096,
        allow_loopback_http: bool = False,
        post: Callable[..., netguard.PostResult] = netguard.post,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.render = render
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.allow_loopback_http = allow_loopback_http
        self._post = post
        # Built once: loading the CA bundle costs ~20 ms, which a context per delivery would pay
        # every time. Same trust store as httpx's default (certifi).
        self.ssl_context = ssl_context or ssl.create_default_context(cafile=certifi.where())

    # -- first attempts, in order
    def drain(self, job_id: str) -> int:
        """Send the job's queued events in order; returns how many attempts were made.

        Only one drainer per job runs at a time; another one returning early is fine, because the
        holder looks at the outbox again after letting go of the lock. A message leaves the outbox
        only after its attempt, so a drainer that dies mid-way leaves it for the next one.
        """
        attempts = 0
        store = self.store
        lock_ttl = self.timeout + 10
        for _ in range(100):  # bounded: each round either sends or finds the outbox empty
            token = secrets.token_hex(8)
            if not store.lock_webhooks(job_id, token, lock_ttl):
                return attempts
            try:
                while head := store.peek_webhooks(job_id):
                    message = json.loads(head[0])
                    if message["type"] == "job.progress" and _is_progress(head[1:]):
                        pass  # a newer progress event is already waiting: this one is stale
                    else:
                        store.renew_webhook_lock(job_id, token, lock_ttl)
                        attempts += self.deliver(job_id, message)
                    store.pop_webhook(job_id)
            finally:
                store.unlock_webhooks(job_id, token)
            if not store.webhook_backlog(job_id):
                return attempts
        return attempts

    # -- one attempt of one message
    def deliver(self, job_id: str, message: dict[str, Any]) -> int:
        """Make one attempt of ``message``; schedule the next on a retryable failure.

        Returns 1 when an attempt was made, 0 when there was nothing to do.
        """
        record = self.store.get(job_id)
        if record is None or not record.webhook:
            logger.info("dropping webhook %s: job %s is gone", message.get("id"), job_id)
            return 0
        message = self._complete(record, message)
        attempt = int(message.get("attempt", 1))
        if attempt == 1 and self.store.webhook_sent(job_id, message["id"]):
            # The same event reached us twice (a redelivered drain, two emitters): once is enough.
            logger.info("webhook %s was already attempted; skipping", message["id"])
            return 0
        if not record.webhook_secrets:
            result = _Attempt(None, "the job has no webhook signing secret", 0.0, retry=False)
        else:
            result = self._send(record, message)
        next_delay = self.policy.delay_after(attempt) if result.retry else None
        self._record(job_id, message, attempt, result, next_delay)
        if attempt == 1:
            self.store.mark_webhook_sent(job_id, message["id"])
        if next_delay is not None:
            self.schedule(job_id, {**message, "attempt": attempt + 1}, next_delay)
        return 1

    def _complete(self, record: JobRecord, message: dict[str, Any]) -> dict[str, Any]:
        # A message sent by another component may carry only its type: fill in the rest now.
        event_type = message["type"]
        if event_type not in EVENT_FILTER:
            raise ValueError(f"unknown webhook event type {event_type!r}")
        filled = dict(message)
        filled.setdefault("id", _message_id(record.id, event_type))
        filled.setdefault("timestamp", _iso(time.time()))
        if "data" not in filled:
            filled["data"] = self.render(record)
        return filled

    def _send(self, record: JobRecord, message: dict[str, Any]) -> _Attempt:
        body = build_body(message["type"], message["timestamp"], message["data"])
        now = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message["id"],
            "webhook-timestamp": str(now),
            "webhook-signature": sign(record.webhook_secrets, message["id"], now, body),
        }
        url = record.webhook["url"] if record.webhook else ""
        started = time.monotonic()
        try:
            result = self._post(
                url,
                body,
                headers,
                timeout=self.timeout,
                max_response_bytes=self.max_response_bytes,
                allow_loopback_http=self.allow_loopback_http,
                ssl_context=self.ssl_context,
            )
        except netguard.UnsafeURL as exc:
            # The address is one we never contact; retrying will not change that.
            return _Attempt(None, str(exc), time.monotonic() - started, retry=False)
        except netguard.FetchError as exc:
            duration = exc.duration if exc.duration is not None else time.monotonic() - started
            return _Attempt(None, str(exc), duration, retry=True)
        code = result.status_code
        if 200 <= code < 300:
            return _Attempt(code, None, result.duration, retry=False)
        if code == 410:
            # Gone: the receiver asks us to stop sending to this endpoint.
            gone = "the receiver answered 410 Gone; not retried"
            return _Attempt(code, gone, result.duration, retry=False)
        error = f"redirect {code} (not followed)" if 300 <= code < 400 else f"HTTP {code}"
        return _Attempt(code, error, result.duration, retry=True)

    def _record(
        self,
        job_id: str,
        message: dict[str, Any],
        attempt: int,
        result: _Attempt,
        next_delay: float | None = None,
    ) -> None:
        delivery: dict[str, Any] = {
            "event": message["type"],
            "id": message["id"],
            "attempt": attempt,
            "at": datetime.now(timezone.utc).isoformat(),
            "status_code": result.status_code,
            "error": result.error,
            "duration_ms": round(result.duration * 1000, 1),
        }
        if next_delay is not None:
            delivery["next_attempt_at"] = _iso(time.time() + next_delay)
        log = logger.info if result.delivered else logger.warning
        log(
            "webhook %s attempt %d: %s",
            message["id"],
            attempt,
            result.status_code if result.delivered else result.error,
        )
        try:
            self.store.record_delivery(job_id, delivery)
        except Exception as exc:
            logger.warning("could not record delivery of %s: %s", message["id"], exc)

    # -- retries
    def schedule(self, job_id: str, message: dict[str, Any], delay: float) -> None:
        """Park a retry in Redis until it is due (see :class:`RetryScheduler`)."""
        self.store.schedule_webhook({"job_id": job_id, "message": message}, time.time() + delay)


def _is_progress(following: list[str]) -> bool:
    """Whether the next message of an outbox (if any) is a progress event."""
    return bool(following) and json.loads(following[0]).get("type") == "job.progress"


class RetryScheduler:
    """Moves retries that are due from Redis onto the webhook queue (runs in webhook workers).

    A due retry is claimed, handed to the broker, then removed from the schedule; one whose
    scheduler dies in between comes due again, so it may be sent twice but is never lost.
    """

    def __init__(self, store: JobStore, app: Celery) -> None:
        self.store = store
        self.app = app

    def run_once(self, limit: int = 100) -> int:
        """Enqueue every due retry (up to ``limit``); returns how many."""
        items = self.store.claim_due_webhooks(limit)
        sent: list[str] = []
        try:
            for raw in items:
                item = json.loads(raw)
                self.app.send_task(
                    DELIVER_WEBHOOK_TASK,
                    args=[item["job_id"], item["message"]],
                    queue=WEBHOOK_QUEUE,
                )
                sent.append(raw)
        except Exception:
            # The rest stay claimed and come due again; try them soon, not in a minute, since
            # the broker may only have blinked.
            for raw in items[len(sent) :]:
                self.store.schedule_webhook(json.loads(raw), time.time() + 1)
            raise
        finally:
            self.store.forget_webhooks(sent)
        return len(items)
