"""Job submission, shared by edits and syntheses: limits, validation, inputs, record, enqueue.

:func:`submit` answers with a :class:`Submitted` outcome, not an HTTP response: the routes turn it
into one (``service.api.responses.submitted_response``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from masactrl_jobs.catalog import UnknownModel
from masactrl_jobs.ids import new_id
from masactrl_jobs.images import ValidatedImage
from masactrl_jobs.schema import (
    EditCreate,
    EditParams,
    JobInput,
    JobKind,
    SequenceParams,
    SynthesisCreate,
)
from masactrl_jobs.store import JobRecord
from service.config import GatewaySettings, Tenant
from service.errors import ApiError, FieldError, invalid
from service.gateway import Gateway
from service.sequences import SequenceUploads, check_sequence, read_inputs
from service.sequences import resolve_input as resolve_sequence_input
from service.validation import check_request, check_webhook_url, resolve_input

__all__ = ["Submitted", "Uploads", "parse_prefer_wait", "request_hash", "submit"]

# Every body a submission route parses (SequenceCreate is a SequenceParams with an image).
JobCreate = EditCreate | EditParams | SynthesisCreate | SequenceParams
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


@dataclass(frozen=True)
class Submitted:
    """What a submission did: the job (with its queue position while queued), and how."""

    record: JobRecord
    # True when the Idempotency-Key named an earlier job with the same request, returned as is.
    replayed: bool = False
    # The seconds of ``Prefer: wait`` honoured before answering; None when none was asked.
    waited_seconds: int | None = None


@dataclass(frozen=True)
class Uploads:
    """Image files sent as multipart parts: the photo, and condition images in target order
    (each standing for the entry of ``condition.images`` at its index)."""

    image: bytes
    conditions: Sequence[bytes] = field(default_factory=tuple)

    def sha256(self) -> str:
        """A digest of the files, for the request hash (the photo's own digest when alone)."""
        image = hashlib.sha256(self.image).hexdigest()
        if not self.conditions:
            return image
        digests = [image, *(hashlib.sha256(c).hexdigest() for c in self.conditions)]
        return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def parse_prefer_wait(prefer: str | None, cap: int) -> int | None:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped; None when absent or malformed."""
    if not prefer:
        return None
    match = _WAIT.search(prefer)
    # An unusable preference is ignored, as RFC 7240 asks, rather than rejected.
    return min(int(match.group(1)), cap) if match else None


def request_hash(kind: JobKind, body: JobCreate, upload_sha256: str | None = None) -> str:
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


def _at_condition_parts(error: FieldError) -> FieldError:
    """``error`` naming the condition_image parts where it names the list they stand for."""
    loc = error.detail.loc
    if loc[:3] != ["body", "condition", "images"]:
        return error
    return FieldError(["body", "condition_image", *loc[3:]], str(error), error.detail.type)


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


async def submit(
    gw: Gateway,
    tenant: Tenant,
    kind: JobKind,
    body: JobCreate,
    *,
    uploads: Uploads | None = None,
    idempotency_key: str | None = None,
    prefer: str | None = None,
    sequence_uploads: SequenceUploads | None = None,
) -> Submitted:
    """Validate, store inputs, record and enqueue one job (or find the one it replays)."""
    wait = parse_prefer_wait(prefer, gw.settings.max_wait_seconds)
    if wait is None:
        return await _submit(
            gw, tenant, kind, body, uploads, idempotency_key, None, sequence_uploads
        )
    # Taken before anything is created, so a refused wait (429) leaves no job behind.
    with gw.hold("wait", tenant):
        return await _submit(
            gw, tenant, kind, body, uploads, idempotency_key, wait, sequence_uploads
        )


def _uploads_digest(uploads: Uploads | None, sequence: SequenceUploads | None) -> str | None:
    """One digest of a request's file parts, for the idempotency hash (None without parts)."""
    if sequence is None:
        return uploads.sha256() if uploads is not None else None
    digest = hashlib.sha256()
    for part in [sequence.image, sequence.video, *sequence.frames]:
        # Lengths first, so that moving bytes from one part to the next changes the digest.
        digest.update(b"-" if part is None else f"{len(part)}:".encode())
        digest.update(part or b"")
    return digest.hexdigest()


async def _submit(
    gw: Gateway,
    tenant: Tenant,
    kind: JobKind,
    body: JobCreate,
    uploads: Uploads | None,
    idempotency_key: str | None,
    wait: int | None,
    sequence_uploads: SequenceUploads | None = None,
) -> Submitted:
    settings = gw.settings
    this_hash = ""
    if idempotency_key is not None:
        this_hash = request_hash(kind, body, _uploads_digest(uploads, sequence_uploads))
        existing = await gw.store.idempotency(tenant.name, idempotency_key)
        if existing is not None:
            replay = await _replay(gw, tenant, existing[1], existing[0], this_hash)
            if replay is not None:
                return replay

    try:
        entry = await gw.model_entry(body.model)
    except UnknownModel as exc:
        raise invalid([FieldError(("body", "model"), str(exc), "unknown_model")]) from None
    if isinstance(body, SequenceParams):
        errors = check_sequence(body, entry, settings, sequence_uploads)
    else:
        errors = check_request(body, entry)
    if body.webhook is not None:
        webhook_error = check_webhook_url(
            body.webhook.url, allow_loopback_http=settings.allow_loopback_http
        )
        if webhook_error is not None:
            errors.append(webhook_error)
    if uploads is not None and uploads.conditions:
        errors = [_at_condition_parts(error) for error in errors]
    if errors:
        raise invalid(errors)

    image: ValidatedImage | None = None
    region_keys: list[tuple[str, str]] = []
    condition_keys: list[str] = []
    source_condition_key: str | None = None
    rate: tuple[float, int] | None = (settings.rate_limit_per_second, settings.rate_limit_burst)
    job_input: JobInput | None = None
    if isinstance(body, SequenceParams):
        # Frames always come as inputs: the same order as below (token, depth, read, depth,
        # store), with the sequence's own reader.
        assert rate is not None  # cleared only below
        limit = await gw.store.rate_limit(tenant.name, *rate)
        if not limit.allowed:
            raise _rate_limited(settings, limit.retry_after)
        rate = None
        await _check_depth(gw, entry.name)
        inputs = await read_inputs(gw.intake, settings, body, sequence_uploads)
        await _check_depth(gw, entry.name)
        to_store = inputs.to_store()
        # Registered for sweeping before they are stored, as for edits below.
        await gw.store.register_inputs([item.key for item in to_store])
        await gw.intake.store(to_store)
        job_input = resolve_sequence_input(body, entry, inputs)
    elif kind is JobKind.edit or body.control.mask.regions or body.condition is not None:
        # Inputs cost bandwidth and storage: spend a token and check the queue before taking
        # them. Jobs without inputs do both inside the step that records them.
        assert rate is not None  # set just above; cleared only after this call
        limit = await gw.store.rate_limit(tenant.name, *rate)
        if not limit.allowed:
            raise _rate_limited(settings, limit.retry_after)
        rate = None
        await _check_depth(gw, entry.name)
        # Every input is read and validated before any is stored: a bad mask must not leave
        # the image behind, outside retention.
        if uploads is not None:
            image = await gw.intake.check(uploads.image, ("body", "image"))
        elif isinstance(body, EditCreate):
            image = await gw.intake.read(body.image, ("body", "image"))
        masks: list[ValidatedImage] = []
        for i, region in enumerate(body.control.mask.regions or []):
            at = ("body", "control", "mask", "regions", i)
            source = await gw.intake.read(region.source, (*at, "source"), "mask")
            target = await gw.intake.read(region.target, (*at, "target"), "mask")
            masks += (source, target)
            region_keys.append((source.key, target.key))
        conditions: list[ValidatedImage] = []
        if body.condition is not None:
            for i, ref in enumerate(body.condition.images):
                if uploads is not None and uploads.conditions:
                    loc: tuple[str | int, ...] = ("body", "condition_image", i)
                    stored = await gw.intake.check(uploads.conditions[i], loc, "condition image")
                else:
                    loc = ("body", "condition", "images", i)
                    stored = await gw.intake.read(ref, loc, "condition image")
                conditions.append(stored)
                condition_keys.append(stored.key)
            if body.condition.source_image is not None:
                stored = await gw.intake.read(
                    body.condition.source_image,
                    ("body", "condition", "source_image"),
                    "condition image",
                )
                conditions.append(stored)
                source_condition_key = stored.key
        # Fetching may have taken seconds: look again, so that the queue filling up meanwhile
        # is caught before anything is stored.
        await _check_depth(gw, entry.name)
        checked = [*([image] if image else []), *masks, *conditions]
        # A job created in the last moment can still make create() answer "full" after the
        # store: registered for sweeping first, the stored inputs never outlive retention.
        await gw.store.register_inputs([item.key for item in checked])
        await gw.intake.store(checked)

    if not isinstance(body, SequenceParams):  # a sequence's input was resolved above
        job_input = resolve_input(
            body,
            entry,
            image_key=image.key if image else None,
            region_keys=region_keys,
            condition_keys=condition_keys,
            source_condition_key=source_condition_key,
        )
    assert job_input is not None
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
        webhook=body.webhook,
        webhook_secrets=tenant.webhook_secrets,
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
