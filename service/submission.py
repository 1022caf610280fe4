"""Job submission, shared by edits and syntheses: limits, validation, inputs, record, enqueue."""

from __future__ import annotations

import hashlib
import json
import re

from fastapi import Response

from masactrl_jobs.catalog import UnknownModel
from masactrl_jobs.images import ValidatedImage
from masactrl_jobs.schema import EditCreate, EditParams, JobKind, SynthesisCreate
from masactrl_jobs.store import JobRecord
from service.config import Tenant
from service.errors import ApiError, FieldError, invalid
from service.gateway import Gateway
from service.validation import check_request, check_webhook_url, resolve_input

__all__ = ["parse_prefer_wait", "request_hash", "submit"]

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


def parse_prefer_wait(prefer: str | None, cap: int) -> int | None:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped; None when absent or malformed."""
    if not prefer:
        return None
    match = _WAIT.search(prefer)
    # An unusable preference is ignored, as RFC 7240 asks, rather than rejected.
    return min(int(match.group(1)), cap) if match else None


def request_hash(
    kind: JobKind, body: EditCreate | EditParams | SynthesisCreate, upload_sha256: str | None = None
) -> str:
    """A digest of what was asked, insensitive to key order, whitespace and spelled-out defaults."""
    canonical = json.dumps(
        [kind.value, body.model_dump(mode="json"), upload_sha256],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _replay(
    gw: Gateway, tenant: Tenant, job_id: str, original_hash: str, this_hash: str
) -> Response | None:
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
    return gw.job_response(
        record, 200, {"Location": gw.render(record).urls.self_, "Idempotent-Replayed": "true"}
    )


async def submit(
    gw: Gateway,
    tenant: Tenant,
    kind: JobKind,
    body: EditCreate | EditParams | SynthesisCreate,
    *,
    upload: bytes | None = None,
    idempotency_key: str | None = None,
    prefer: str | None = None,
) -> Response:
    """Validate, store inputs, record and enqueue one job; the 202 (or 200 replay) response."""
    settings = gw.settings
    upload_sha = hashlib.sha256(upload).hexdigest() if upload is not None else None
    this_hash = request_hash(kind, body, upload_sha)
    if idempotency_key is not None:
        existing = await gw.store.idempotency(tenant.name, idempotency_key)
        if existing is not None:
            replay = await _replay(gw, tenant, existing[1], existing[0], this_hash)
            if replay is not None:
                return replay

    limit = await gw.store.rate_limit(
        tenant.name, settings.rate_limit_per_second, settings.rate_limit_burst
    )
    if not limit.allowed:
        retry = max(1, int(limit.retry_after + 0.999))
        raise ApiError(
            429,
            "rate_limited",
            f"Too many submissions; this key may submit {settings.rate_limit_per_second:g} jobs "
            f"per second (bursts of {settings.rate_limit_burst}). Retry in {retry} s.",
            headers={"Retry-After": str(retry)},
        )

    try:
        entry = gw.catalog.get(body.model)
    except UnknownModel as exc:
        raise invalid([FieldError(("body", "model"), str(exc), "unknown_model")]) from None
    errors = check_request(body, entry)
    if body.webhook is not None:
        webhook_error = check_webhook_url(
            body.webhook.url, allow_loopback_http=settings.allow_loopback_http
        )
        if webhook_error is not None:
            errors.append(webhook_error)
    if errors:
        raise invalid(errors)

    queue_full = ApiError(
        429,
        "queue_full",
        f"The queue for {entry.name} is full ({settings.max_queue_depth} jobs waiting); retry "
        "later.",
        headers={"Retry-After": str(settings.queue_full_retry_after_seconds)},
    )
    image: ValidatedImage | None = None
    region_keys: list[tuple[str, str]] = []
    if kind is JobKind.edit or body.control.mask.regions:
        # Inputs cost bandwidth and storage: refuse early when the queue cannot take the job.
        if settings.max_queue_depth:
            depth = (await gw.store.queue_depths([entry.name]))[entry.name]
            if depth >= settings.max_queue_depth:
                raise queue_full
        if upload is not None:
            image = await gw.intake.ingest_bytes(upload, ("body", "image"))
        elif isinstance(body, EditCreate):
            image = await gw.intake.ingest(body.image, ("body", "image"))
        for i, region in enumerate(body.control.mask.regions or []):
            at = ("body", "control", "mask", "regions", i)
            source = await gw.intake.ingest(region.source, (*at, "source"), "mask")
            target = await gw.intake.ingest(region.target, (*at, "target"), "mask")
            region_keys.append((source.key, target.key))

    job_input = resolve_input(
        body, entry, image_key=image.key if image else None, region_keys=region_keys
    )
    result = await gw.store.create(
        tenant=tenant.name,
        kind=kind,
        model=entry.name,
        input=job_input,
        request_hash=this_hash,
        idempotency_key=idempotency_key,
        max_queue_depth=settings.max_queue_depth,
        webhook=body.webhook,
        webhook_secrets=tenant.webhook_secrets,
    )
    if result.outcome == "full":
        raise queue_full
    if result.outcome == "duplicate":
        # A concurrent request with the same key won the race.
        assert result.job_id is not None and result.request_hash is not None
        replay = await _replay(gw, tenant, result.job_id, result.request_hash, this_hash)
        if replay is None:
            raise ApiError(409, "conflict", "A request with this Idempotency-Key is in flight.")
        return replay
    record = result.record
    assert record is not None
    await gw.enqueue(record.id, entry.name)
    gw.metrics.jobs_submitted.labels(kind.value, entry.name).inc()

    headers = {"Location": f"{settings.public_base_url}/v1/jobs/{record.id}"}
    wait = parse_prefer_wait(prefer, settings.max_wait_seconds)
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}"
        waited: JobRecord | None = await gw.wait_until_done(record.id, wait)
        record = waited or record
    return gw.job_response(record, 202, headers)
