"""OpenAPI descriptions of the error answers, so the contract lists every status a route gives."""

from __future__ import annotations

from typing import Any

from masactrl_jobs.schema import ErrorBody, JobPublic

__all__ = ["JOB_HEADERS", "errors", "job_response"]

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


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses, all with the error body."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def job_response(description: str, headers: bool = False) -> dict[str, Any]:
    """A ``responses=`` entry whose body is the job object."""
    entry: dict[str, Any] = {"model": JobPublic, "description": description}
    if headers:
        entry["headers"] = JOB_HEADERS
    return entry
