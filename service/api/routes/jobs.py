"""Jobs: read, list, cancel, retry, and follow as Server-Sent Events."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from masactrl_jobs.ids import is_job_id
from masactrl_jobs.schema import JobList, JobStatus, PreviewImage, ProgressPhase, RetryCreate
from masactrl_jobs.store import JobEvent, PreviewRecord
from masactrl_jobs.store.render import public_preview
from service.api.deps import GatewayDep, Prefer, TenantDep
from service.api.responses import errors, job_response, json_errors
from service.errors import ApiError, FieldError, invalid, shown_id
from service.gateway import Gateway
from service.submission import QUEUE_OPTIONS, QUEUE_RULES, parse_prefer_wait, retry

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
JOB_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class StatusEvent(BaseModel):
    """Data of a `status` event."""

    job_id: str
    status: JobStatus
    attempt: int | None = Field(None, description="Set when the job starts running.")


class ProgressEvent(BaseModel):
    """Data of a `progress` event."""

    job_id: str
    phase: ProgressPhase
    step: int
    total: int
    fraction: float = Field(description="`step / total`, 0 to 1.")
    frames_done: int | None = Field(
        default=None, description="Sequences only: frames decoded so far (they come at the end)."
    )


class PreviewEvent(BaseModel):
    """Data of a `preview` event (jobs submitted with `previews: true`): small images of what
    the run currently predicts each output image will be, every few steps."""

    job_id: str
    step: int = Field(description="The denoising step the preview shows.")
    steps: int = Field(description="The job's denoising steps.")
    images: list[PreviewImage] = Field(
        description="The source first, then each target (sequences: each frame); `role` and "
        "`index` are those of the output image each one previews. The URLs are signed and "
        "live a few minutes; an `<img src>` loads them without an Authorization header."
    )


class RequeuedEvent(BaseModel):
    """Data of a `requeued` event: the run was abandoned (its worker died or lost Redis) and the
    job is queued again for another attempt."""

    status: JobStatus
    attempt: int = Field(description="The attempt that was abandoned.")


# Blocking reads stay below the store's socket timeout; see Gateway.wait_until_done.
_BLOCK_MS = 1000


@router.get("", response_model=JobList, responses=errors(401, 422, 503))
async def list_jobs(
    gateway: GatewayDep,
    tenant: TenantDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=JOB_ID_PATTERN,
            description="`next_cursor` of the previous page (a job id).",
        ),
    ] = None,
) -> Response:
    """List your jobs, newest first, a page at a time."""
    if cursor is not None and not is_job_id(cursor):
        raise invalid([FieldError(("query", "cursor"), "cursor is not a value from next_cursor")])
    records, next_cursor = await gateway.store.list(
        tenant.name, status=status, limit=limit, cursor=cursor
    )
    page = JobList(data=[gateway.render(r) for r in records], next_cursor=next_cursor)
    return Response(page.model_dump_json(), media_type="application/json")


@router.get(
    "/{job_id}",
    response_model=None,
    responses={200: job_response("The job."), **errors(401, 404, 422, 503)},
)
async def get_job(
    job_id: str, gateway: GatewayDep, tenant: TenantDep, prefer: Prefer = None
) -> Response:
    """Get a job; with `Prefer: wait=N`, wait up to N seconds for it to end first."""
    record = await gateway.owned_job(tenant, job_id)
    headers = {}
    wait = parse_prefer_wait(prefer, gateway.settings.max_wait_seconds)
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}"
        if not record.status.is_terminal():
            with gateway.hold("wait", tenant):
                record = await gateway.wait_until_done(job_id, wait) or record
    return gateway.job_response(record, 200, headers)


@router.post(
    "/{job_id}/cancel",
    response_model=None,
    responses={
        200: job_response("The job was queued and is now canceled."),
        202: job_response("The job is running; it stops at its next step."),
        **errors(401, 404, 409, 422, 503),
    },
)
async def cancel_job(job_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    """Cancel a job: at once when queued, at the next step when running."""
    await gateway.owned_job(tenant, job_id)
    result = await gateway.store.cancel(job_id)
    if result.outcome == "missing":
        raise ApiError(404, "not_found", f"No job with id {shown_id(job_id)}.")
    if result.outcome == "conflict":
        raise ApiError(
            409,
            "job_finished",
            f"The job already ended ({result.previous}); only queued or running jobs can be "
            "canceled.",
        )
    record = await gateway.owned_job(tenant, job_id)
    return gateway.job_response(record, 200 if result.outcome == "canceled" else 202)


@router.post(
    "/{job_id}/retry",
    response_model=None,
    status_code=201,
    description="Run a failed, canceled or expired job again: a new job with its parameters and "
    "inputs, linked both ways (`retry_of`, `retried_by`). `409` for a queued, running or "
    "succeeded job, one already retried, or one whose inputs are past retention.\n" + QUEUE_RULES,
    openapi_extra={QUEUE_OPTIONS: True},
    responses={
        201: job_response("The new job, queued, with `retry_of` naming this one.", True),
        **errors(401, 404, 409, 422, 429, 503),
    },
)
async def retry_job(
    job_id: str,
    gateway: GatewayDep,
    tenant: TenantDep,
    options: Annotated[RetryCreate | None, Body()] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Retry-safe: the same key and body return the job the first call made.",
        ),
    ] = None,
) -> Response:
    """Run a failed, canceled or expired job again: a new job with its parameters and inputs."""
    submitted = await retry(gateway, tenant, job_id, options, idempotency_key)
    headers = {"Location": f"{gateway.settings.public_base_url}/v1/jobs/{submitted.record.id}"}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
        return gateway.job_response(submitted.record, 200, headers)
    return gateway.job_response(submitted.record, 201, headers)


def _latest_previews(events: list[JobEvent]) -> list[JobEvent]:
    """``events`` without the preview events that a later one in the same read supersedes.

    Only the latest preview's images are kept in storage, and a client that catches up (a
    reconnect, a slow reader) needs only the newest picture.
    """
    last = max((i for i, e in enumerate(events) if e.event == "preview"), default=-1)
    return [e for i, e in enumerate(events) if e.event != "preview" or i == last]


async def _events(gateway: Gateway, job_id: str, after: str) -> AsyncIterator[ServerSentEvent]:
    store = gateway.store
    while True:
        events = await store.wait_events(job_id, after=after, block_ms=_BLOCK_MS)
        for event in _latest_previews(events):
            after = event.id
            if event.event == "preview":
                preview = public_preview(PreviewRecord.from_json(event.data), gateway.preview_url)
                shown = {"job_id": job_id, **preview.model_dump(mode="json")}
                yield ServerSentEvent(json.dumps(shown), event=event.event, id=event.id)
                continue
            if event.is_terminal:
                record = await store.get(job_id)
                data: Any = (
                    gateway.render(record).model_dump(mode="json")
                    if record is not None
                    else {"id": job_id, **event.data}
                )
                yield ServerSentEvent(json.dumps(data), event=event.event, id=event.id)
                return
            payload = {"job_id": job_id, **event.data}
            yield ServerSentEvent(json.dumps(payload), event=event.event, id=event.id)
        if not events:
            record = await store.get(job_id)
            if record is None or record.status.is_terminal():
                return  # expired, or the terminal event was already sent before `after`


class EventStream(Response):
    """What the events route answers, for its OpenAPI entry: ``text/event-stream`` only (the
    route returns an ``EventSourceResponse``, or a bare 204)."""

    media_type = "text/event-stream"


_SSE_EVENTS = (
    "status",
    "progress",
    "preview",
    "requeued",
    "succeeded",
    "failed",
    "canceled",
    "expired",
)


@router.get(
    "/{job_id}/events",
    response_model=None,
    response_class=EventStream,
    responses={
        200: {
            "description": (
                "Server-Sent Events, each with an `id` (reconnect with `Last-Event-ID` to resume "
                "after it), an `event` name and JSON `data`: `status` (StatusEvent) when the "
                "status changes, `progress` (ProgressEvent) at each step, `preview` "
                "(PreviewEvent) every few steps of a job submitted with `previews: true` (only "
                "the latest preview matters: earlier ones' images are deleted), `requeued` "
                "(RequeuedEvent) when an abandoned run puts the job back in the queue, then "
                "exactly one of "
                "`succeeded`, `failed`, `canceled`, `expired` whose data is the job object "
                "(JobPublic), "
                "after which the stream ends. Comment lines (`: ping`) keep idle connections "
                "open."
            ),
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": "`id: <id>`, `event: <name>`, `data: <JSON>` lines.",
                    },
                    # One event of the stream: OpenAPI 3.2's itemSchema for sequential media
                    # types, as an extension while the document is 3.1 (whose tools read the
                    # string schema above); x-sse-events maps each event's data to its schema.
                    "x-item-schema": {
                        "type": "object",
                        "required": ["id", "event", "data"],
                        "properties": {
                            "id": {"type": "string", "pattern": r"^\d{1,20}-\d{1,20}$"},
                            "event": {"type": "string", "enum": list(_SSE_EVENTS)},
                            "data": {"type": "string", "contentMediaType": "application/json"},
                        },
                    },
                    "x-sse-events": {
                        "status": {"$ref": "#/components/schemas/StatusEvent"},
                        "progress": {"$ref": "#/components/schemas/ProgressEvent"},
                        "preview": {"$ref": "#/components/schemas/PreviewEvent"},
                        "requeued": {"$ref": "#/components/schemas/RequeuedEvent"},
                        **{
                            name: {"$ref": "#/components/schemas/JobPublic"}
                            for name in ("succeeded", "failed", "canceled", "expired")
                        },
                    },
                }
            },
        },
        204: {"description": "Nothing follows `Last-Event-ID`: the job has ended."},
        **json_errors(401, 404, 422, 503),
    },
)
async def stream_job_events(
    job_id: str,
    gateway: GatewayDep,
    tenant: TenantDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            # The pattern bounds the length (at most 41 characters).
            pattern=_STREAM_ID.pattern,
            examples=["1733580000000-0"],
            description="Resume after this event (the `id` of an event of this stream).",
        ),
    ] = None,
) -> Response:
    """Follow a job's status and progress as Server-Sent Events (resumable)."""
    record = await gateway.owned_job(tenant, job_id)
    after = "0"
    if last_event_id:
        if not _STREAM_ID.match(last_event_id):
            raise invalid(
                [FieldError(("header", "Last-Event-ID"), "not an event id from this stream")]
            )
        after = last_event_id
        if record.status.is_terminal() and not await gateway.store.read_events(job_id, after, 1):
            # 204 tells an EventSource to stop reconnecting: there is nothing more to say.
            return Response(status_code=204)
    return _HeldEventSource(
        gateway.hold("stream", tenant),
        _events(gateway, job_id, after),
        ping=gateway.settings.sse_ping_seconds,
    )


class _HeldEventSource(EventSourceResponse):
    """An event stream that counts against its tenant's cap from now until it closes."""

    def __init__(
        self, held: contextlib.AbstractContextManager[None], *args: Any, **kwargs: Any
    ) -> None:
        # Entered here, so the route answers 429 itself; left however the stream ends.
        held.__enter__()
        self._held = held
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            held.__exit__(None, None, None)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._held.__exit__(None, None, None)
