"""Job submission, shared by every job kind: limits, validation, inputs, record, enqueue.

What differs between kinds (their checks, inputs and resolved input) is the kind's own
(``masactrl_jobs.kinds``): :func:`submit` looks the kind up in the registry and calls it, in the
same order for every kind. What is the same for all stays here: idempotency, the model, the
webhook URL, the rate token and queue checks around reading inputs, storing them, and the one
script that records and enqueues the job.

:func:`submit` answers with a :class:`Submitted` outcome, not an HTTP response: the routes turn it
into one (``service.api.responses.submitted_response``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from masactrl_jobs.catalog import ModelEntry, UnknownModel
from masactrl_jobs.ids import new_id
from masactrl_jobs.kinds import Kind, kind_of
from masactrl_jobs.kinds.base import Inputs, Issue, JobBody, Refused
from masactrl_jobs.schema import RETRYABLE_STATUSES, JobKind, RetryCreate, WebhookCreate
from masactrl_jobs.store import JobRecord
from service.config import GatewaySettings, Tenant
from service.errors import ApiError, FieldError, invalid, shown_id
from service.gateway import Gateway
from service.validation import check_webhook_url

__all__ = [
    "QUEUE_OPTIONS",
    "QUEUE_RULES",
    "Submitted",
    "deadline_of",
    "parse_prefer_wait",
    "queue_issues",
    "request_hash",
    "retry",
    "submit",
]

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


@dataclass(frozen=True)
class Submitted:
    """What a submission did: the job (with its queue position while queued), and how."""

    record: JobRecord
    # True when the Idempotency-Key named an earlier job with the same request, returned as is.
    replayed: bool = False
    # The seconds of ``Prefer: wait`` honoured before answering; None when none was asked.
    waited_seconds: int | None = None


def parse_prefer_wait(prefer: str | None, cap: int) -> int | None:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped; None when absent or malformed."""
    if not prefer:
        return None
    match = _WAIT.search(prefer)
    # An unusable preference is ignored, as RFC 7240 asks, rather than rejected.
    return min(int(match.group(1)), cap) if match else None


def request_hash(kind: JobKind, body: BaseModel, upload_sha256: str | None = None) -> str:
    """A digest of what was asked, insensitive to key order, whitespace and spelled-out defaults."""
    canonical = json.dumps(
        [kind.value, body.model_dump(mode="json"), upload_sha256],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _queue_full(settings: GatewaySettings, model: str) -> ApiError:
    return ApiError(
        429,
        "queue_full",
        f"The queue for {model} is full ({settings.max_queue_depth} jobs waiting); retry later.",
        headers={"Retry-After": str(settings.queue_full_retry_after_seconds)},
    )


async def _check_depth(gw: Gateway, model: str) -> None:
    """429 when the model's queue is at its limit (the create step checks again, atomically)."""
    if gw.settings.max_queue_depth:
        depth = (await gw.store.queue_depths([model]))[model]
        if depth >= gw.settings.max_queue_depth:
            raise _queue_full(gw.settings, model)


def _rate_limited(settings: GatewaySettings, retry_after: float) -> ApiError:
    retry = max(1, math.ceil(retry_after))
    return ApiError(
        429,
        "rate_limited",
        f"Too many submissions; this key may submit {settings.rate_limit_per_second:g} jobs per "
        f"second (bursts of {settings.rate_limit_burst}). Retry in {retry} s.",
        headers={"Retry-After": str(retry)},
    )


async def _replay(
    gw: Gateway, tenant: Tenant, job_id: str, original_hash: str, this_hash: str
) -> Submitted | None:
    if original_hash != this_hash:
        raise invalid(
            [
                FieldError(
                    ("header", "Idempotency-Key"),
                    "this Idempotency-Key was already used with a different request body",
                    "idempotency_key_reused",
                )
            ]
        )
    record = await gw.store.get(job_id)
    if record is None or record.tenant != tenant.name:
        return None  # the original has expired: treat this as a new request
    return Submitted(record, replayed=True)


def _field_error(issue: Issue) -> FieldError:
    return FieldError(issue.loc, issue.message, issue.type)


def _refused(refused: Refused) -> ApiError:
    """The error a kind's refusal while reading its inputs answers: a 413 names the field too."""
    error = _field_error(refused.issue)
    if not refused.too_large:
        return invalid([error])
    message = refused.issue.message
    return ApiError(
        413, "payload_too_large", message[:1].upper() + message[1:] + ".", details=[error.detail]
    )


async def submit(
    gw: Gateway,
    tenant: Tenant,
    kind: JobKind,
    body: BaseModel,
    *,
    files: Any = None,
    idempotency_key: str | None = None,
    prefer: str | None = None,
) -> Submitted:
    """Validate, store inputs, record and enqueue one job of ``kind`` (or find the one it
    replays). ``body`` is one of the kind's bodies, ``files`` its multipart file parts."""
    spec = kind_of(kind)
    if not isinstance(body, spec.bodies):
        raise TypeError(f"a {kind.value} job takes {spec.bodies}, not {type(body).__name__}")
    wait = parse_prefer_wait(prefer, gw.settings.max_wait_seconds)
    if wait is None:
        return await _submit(gw, tenant, spec, body, files, idempotency_key, None)
    # Taken before anything is created, so a refused wait (429) leaves no job behind.
    with gw.hold("wait", tenant):
        return await _submit(gw, tenant, spec, body, files, idempotency_key, wait)


async def _take_token(gw: Gateway, tenant: Tenant) -> None:
    """Spend a rate token now (429 when there is none)."""
    settings = gw.settings
    limit = await gw.store.rate_limit(
        tenant.name, settings.rate_limit_per_second, settings.rate_limit_burst
    )
    if not limit.allowed:
        raise _rate_limited(settings, limit.retry_after)


async def _read_inputs(
    gw: Gateway, spec: Kind[Any, Any, Any], body: Any, files: Any, model: str
) -> Inputs:
    """The request's inputs, read, checked and stored (after its rate token was spent)."""
    await _check_depth(gw, model)
    # One intake per request: its inputs share one byte budget, and its temporary files are
    # closed (its bytes given back) when it ends, stored or refused (service/intake.py).
    async with gw.intake.request() as intake:
        # Every input is read and validated before any is stored: a bad mask must not leave the
        # image behind, outside retention.
        try:
            inputs: Inputs = await spec.read_inputs(intake, gw.settings, body, files)
        except Refused as refused:
            raise _refused(refused) from None
        # Fetching may have taken seconds: look again, so that the queue filling up meanwhile
        # is caught before anything is stored.
        await _check_depth(gw, model)
        to_store = inputs.to_store()
        # A job created in the last moment can still make create() answer "full" after the
        # store: registered for sweeping first, the stored inputs never outlive retention.
        await gw.store.register_inputs([item.key for item in to_store])
        await intake.store(to_store)
    return inputs


# What queue_issues checks, for the OpenAPI descriptions of the operations that take the options.
QUEUE_RULES = """
Queue options (`priority`, `start_by`, `max_queue_seconds`), each refused with a 422 at the field:

- `priority` within the range the API key allows (its `priorities`, default -10 to 10);
- `start_by` or `max_queue_seconds`, not both; `start_by` not already past.
"""
# The OpenAPI extension marking an operation whose body has the queue options' rules, which JSON
# Schema cannot state (they depend on the key, on each other and on the time).
QUEUE_OPTIONS = "x-queue-options"


def queue_issues(tenant: Tenant, body: Any, now: float) -> list[FieldError]:
    """What is wrong with a request's queue options for this tenant: a priority outside the
    range its key allows, both deadlines, or a deadline already past."""
    errors = []
    low, high = tenant.priorities
    if not low <= body.priority <= high:
        errors.append(
            FieldError(
                ("body", "priority"),
                f"this API key allows priorities from {low} to {high}",
                "priority_not_allowed",
            )
        )
    if body.start_by is not None and body.max_queue_seconds is not None:
        errors.append(
            FieldError(
                ("body", "max_queue_seconds"),
                "give start_by or max_queue_seconds, not both",
                "deadline_conflict",
            )
        )
    elif body.start_by is not None and body.start_by.timestamp() <= now:
        errors.append(
            FieldError(("body", "start_by"), "the deadline has already passed", "deadline_passed")
        )
    return errors


def deadline_of(body: Any, now: float) -> float | None:
    """The Unix time by which the job must have started, if the request set one."""
    if body.start_by is not None:
        return float(body.start_by.timestamp())
    if body.max_queue_seconds is not None:
        return now + body.max_queue_seconds
    return None


async def _checked(
    gw: Gateway, tenant: Tenant, spec: Kind[Any, Any, Any], body: Any, files: Any
) -> ModelEntry:
    """The model the request names, as its live workers measured it, once the request has
    passed the kind's checks, the webhook's and the queue options' (422 listing every problem
    otherwise)."""
    job_body: JobBody = body
    try:
        entry = await gw.model_entry(job_body.model)
    except UnknownModel as exc:
        raise invalid([FieldError(("body", "model"), str(exc), "unknown_model")]) from None
    errors = [_field_error(issue) for issue in spec.check(body, entry, gw.settings, files)]
    if job_body.webhook is not None:
        webhook_error = check_webhook_url(
            job_body.webhook.url, allow_loopback_http=gw.settings.allow_loopback_http
        )
        if webhook_error is not None:
            errors.append(webhook_error)
    errors += queue_issues(tenant, body, time.time())
    if errors:
        raise invalid(errors)
    return entry


async def _submit(
    gw: Gateway,
    tenant: Tenant,
    spec: Kind[Any, Any, Any],
    body: Any,
    files: Any,
    idempotency_key: str | None,
    wait: int | None,
) -> Submitted:
    settings = gw.settings
    kind = spec.kind
    job_body: JobBody = body
    this_hash = ""
    if idempotency_key is not None:
        digest = spec.files_digest(files) if files is not None else None
        this_hash = request_hash(kind, body, digest)
        existing = await gw.store.idempotency(tenant.name, idempotency_key)
        if existing is not None:
            replay = await _replay(gw, tenant, existing[1], existing[0], this_hash)
            if replay is not None:
                return replay

    entry = await _checked(gw, tenant, spec, body, files)
    rate: tuple[float, int] | None = (settings.rate_limit_per_second, settings.rate_limit_burst)
    inputs: Inputs | None = None
    if spec.takes_inputs(body, files):
        # Inputs cost bandwidth and storage: spend a token and check the queue before taking
        # them. Jobs without inputs do both inside the step that records them.
        await _take_token(gw, tenant)
        rate = None
        inputs = await _read_inputs(gw, spec, body, files, entry.name)
    job_input = spec.resolve(body, entry, inputs)
    job_id = new_id()
    result = await gw.store.create(
        job_id=job_id,
        message=gw.messages.build(job_id, entry.name),
        rate_limit=rate,
        tenant=tenant.name,
        kind=kind,
        model=entry.name,
        input=job_input,
        request_hash=this_hash,
        idempotency_key=idempotency_key,
        max_queue_depth=settings.max_queue_depth,
        webhook=job_body.webhook,
        webhook_secrets=tenant.webhook_secrets,
        priority=body.priority,
        weight=tenant.weight,
        deadline_at=deadline_of(body, time.time()),
    )
    if result.outcome == "full":
        raise _queue_full(settings, entry.name)
    if result.outcome == "rate_limited":
        raise _rate_limited(settings, result.retry_after)
    if result.outcome == "duplicate":
        # A concurrent request with the same key won the race.
        assert result.job_id is not None and result.request_hash is not None
        replay = await _replay(gw, tenant, result.job_id, result.request_hash, this_hash)
        if replay is None:
            raise ApiError(409, "conflict", "A request with this Idempotency-Key is in flight.")
        return replay
    record = result.record
    assert record is not None
    gw.metrics.submitted(kind.value, entry.name)

    if wait is not None:
        waited: JobRecord | None = await gw.wait_until_done(record.id, wait)
        record = waited or record
    return Submitted(record, waited_seconds=wait)


async def retry(
    gw: Gateway,
    tenant: Tenant,
    job_id: str,
    options: RetryCreate | None,
    idempotency_key: str | None = None,
) -> Submitted:
    """A new job with the parameters and inputs of the tenant's failed, canceled or expired job
    ``job_id``, linked to it both ways (``retry_of``, ``retried_by``). ``options`` set the new
    job's priority and deadline; by default it keeps the priority and has no deadline."""
    settings = gw.settings
    options = options or RetryCreate()
    this_hash = ""
    if idempotency_key is not None:
        this_hash = request_hash(JobKind.edit, RetryRequest(job_id=job_id, options=options))
        existing = await gw.store.idempotency(tenant.name, idempotency_key)
        if existing is not None:
            replay = await _replay(gw, tenant, existing[1], existing[0], this_hash)
            if replay is not None:
                return replay
    original = await gw.owned_job(tenant, job_id)
    if original.status not in RETRYABLE_STATUSES:
        raise _not_retryable(original.status.value)
    priority = original.priority if options.priority is None else options.priority
    errors = queue_issues(tenant, options.model_copy(update={"priority": priority}), time.time())
    if errors:
        raise invalid(errors)
    missing = [key for key in original.input_keys if not await gw.intake.stored(key)]
    if missing:
        raise ApiError(
            409,
            "inputs_gone",
            "The job's inputs are no longer kept (past retention); submit it again with them.",
        )
    new_id_ = new_id()
    webhook = (
        WebhookCreate.model_validate(
            {"url": original.webhook["url"], "events": original.webhook["events"]}
        )
        if original.webhook
        else None
    )
    result = await gw.store.create(
        job_id=new_id_,
        message=gw.messages.build(new_id_, original.model),
        rate_limit=(settings.rate_limit_per_second, settings.rate_limit_burst),
        tenant=tenant.name,
        kind=original.kind,
        model=original.model,
        input=original.input,
        request_hash=this_hash,
        idempotency_key=idempotency_key,
        max_queue_depth=settings.max_queue_depth,
        webhook=webhook,
        webhook_secrets=tenant.webhook_secrets,
        priority=priority,
        weight=tenant.weight,
        deadline_at=deadline_of(options, time.time()),
        retry_of=original.id,
    )
    if result.outcome == "full":
        raise _queue_full(settings, original.model)
    if result.outcome == "rate_limited":
        raise _rate_limited(settings, result.retry_after)
    if result.outcome == "missing":
        raise ApiError(404, "not_found", f"No job with id {shown_id(job_id)}.")
    if result.outcome == "not_retryable":
        raise _not_retryable(result.previous or "")
    if result.outcome == "retried":
        raise ApiError(
            409, "already_retried", f"The job was already retried by job {result.job_id}."
        )
    if result.outcome == "duplicate":
        assert result.job_id is not None and result.request_hash is not None
        replay = await _replay(gw, tenant, result.job_id, result.request_hash, this_hash)
        if replay is None:
            raise ApiError(409, "conflict", "A request with this Idempotency-Key is in flight.")
        return replay
    assert result.record is not None
    gw.metrics.submitted(original.kind.value, original.model)
    return Submitted(result.record)


class RetryRequest(BaseModel):
    """What a retry asks (its Idempotency-Key's request hash covers both)."""

    job_id: str
    options: RetryCreate


def _not_retryable(status: str) -> ApiError:
    return ApiError(
        409,
        "not_retryable",
        f"The job is {status}; only failed, canceled or expired jobs can be retried.",
    )
