"""The routes' answers: a submission's HTTP response, and the OpenAPI descriptions of answers
(error statuses included, so the contract lists every status a route gives)."""

from __future__ import annotations

from typing import Any

from fastapi import Response

from masactrl_jobs.schema import ErrorBody, JobPublic
from service.gateway import Gateway
from service.submission import Submitted

__all__ = ["JOB_HEADERS", "errors", "json_errors", "job_response", "submitted_response"]

_DESCRIPTIONS = {
    400: "Malformed request.",
    401: "Missing or invalid API key.",
    403: "Invalid or expired signature.",
    404: "No such resource (jobs of other tenants are reported as missing).",
    409: "The job already ended.",
    413: "The request body is too large.",
    415: "Unsupported content type.",
    422: "Invalid request: each problem with its field path and a sentence.",
    429: "Rate limit or model queue full; see Retry-After.",
    503: "Redis, storage or the broker is unreachable; see Retry-After.",
}

JOB_HEADERS = {
    "Location": {"description": "URL of the job.", "schema": {"type": "string"}},
}
# OpenAPI links: what a client (or a stateful test) does next with a created job.
JOB_LINKS = {
    name: {
        "operationId": name,
        "parameters": {"job_id": "$response.body#/id"},
        "description": description,
    }
    for name, description in (
        ("getJob", "Read the job (`Prefer: wait=N` to wait for its end)."),
        ("cancelJob", "Cancel the job."),
        ("streamJobEvents", "Follow the job as Server-Sent Events."),
    )
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses, all with the error body."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def json_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """:func:`errors` for a route whose own answers are not JSON (its response class would
    otherwise give the error bodies its media type): the error body as ``application/json``."""
    body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}}
    return {code: {"description": _DESCRIPTIONS[code], "content": body} for code in codes}


def job_response(description: str, headers: bool = False) -> dict[str, Any]:
    """A ``responses=`` entry whose body is the job object."""
    entry: dict[str, Any] = {"model": JobPublic, "description": description}
    if headers:
        entry["headers"] = JOB_HEADERS
        entry["links"] = JOB_LINKS
    return entry


def submitted_response(gateway: Gateway, submitted: Submitted) -> Response:
    """202 with the new job (200 for an idempotent replay), its Location and what was applied."""
    record = submitted.record
    headers = {"Location": f"{gateway.settings.public_base_url}/v1/jobs/{record.id}"}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
        return gateway.job_response(record, 200, headers)
    if submitted.waited_seconds is not None:
        headers["Preference-Applied"] = f"wait={submitted.waited_seconds}"
    return gateway.job_response(record, 202, headers)
