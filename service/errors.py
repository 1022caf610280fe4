"""One error body for every non-2xx answer, and the handlers that produce it.

``{"error": {"code", "message", "details": [{"loc", "message", "type"}]}}``: a stable code for
programs, one sentence for people, and for 422 the path of every offending field.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from masactrl_jobs.schema import ErrorBody, ErrorDetail, ErrorInfo
from masactrl_jobs.storage import StorageUnavailable

__all__ = [
    "ApiError",
    "FieldError",
    "Loc",
    "error_response",
    "install_error_handlers",
    "invalid",
    "shown_id",
]

Loc = Sequence[str | int]
# Ids and other caller-given values are echoed in messages at most this long.
_SHOWN_CHARS = 64


def shown_id(value: str) -> str:
    """``value`` quoted for a message, cut to 64 characters: a 5,000-character id is not echoed."""
    return repr(value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "…")


logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying after a dependency outage.
UNAVAILABLE_RETRY_AFTER = 5

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


class FieldError(Exception):
    """One invalid field: where (``loc``), a sentence, and a short type."""

    def __init__(self, loc: Sequence[str | int], message: str, type: str = "value_error") -> None:
        super().__init__(message)
        self.detail = ErrorDetail(loc=list(loc), message=message, type=type)


class ApiError(Exception):
    """An expected failure with its HTTP status, code and sentence."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Sequence[ErrorDetail] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details)
        self.headers = dict(headers or {})


def invalid(errors: Sequence[FieldError | ErrorDetail]) -> ApiError:
    """A 422 listing every field error; the message names the first."""
    details = [e.detail if isinstance(e, FieldError) else e for e in errors]
    first = details[0]
    where = ".".join(str(part) for part in first.loc if part != "body") or "request"
    name = str(first.loc[-1]) if first.loc else ""
    # "start_step must be ..." already names its field: say it once, with its full path
    # ("control.start_step must be ..."), not "control.start_step: start_step must be ...".
    said = name and first.message.startswith((f"{name} ", f"{name}:"))
    message = where + first.message[len(name) :] if said else f"{where}: {first.message}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more problem{'s' if len(details) > 2 else ''})"
    return ApiError(422, "invalid_request", message, details=details)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[ErrorDetail] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The JSON response for an error."""
    body = ErrorBody(error=ErrorInfo(code=code, message=message, details=list(details)))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _sentence(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    loc = error.get("loc", ())
    if kind == "extra_forbidden":
        return f"unknown field {loc[-1]!r}" if loc else "unknown field"
    if kind == "missing":
        return "this field is required"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "json_invalid":
        ctx = error.get("ctx") or {}
        return f"the body is not valid JSON ({ctx.get('error', 'parse error')})"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def validation_details(
    errors: Sequence[Mapping[str, Any]], prefix: Sequence[str | int] = ()
) -> list[ErrorDetail]:
    """pydantic/FastAPI errors as error details (``prefix`` is prepended to each location)."""
    return [
        ErrorDetail(
            loc=[*prefix, *(p if isinstance(p, int) else str(p) for p in e.get("loc", ()))],
            message=_sentence(e),
            type=str(e.get("type", "value_error")),
        )
        for e in errors
    ]


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _field_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    error = invalid([exc])
    return error_response(error.status, error.code, error.message, error.details)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = invalid(validation_details(exc.errors()))
    return error_response(error.status, error.code, error.message, error.details)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode (bad UTF-8, broken form data): report it
        # like every other invalid request.
        error = invalid([FieldError(("body",), f"the body cannot be parsed ({exc.detail})")])
        return error_response(error.status, error.code, error.message, error.details)
    code = _STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "There is nothing at this path."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on this path."
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "service_unavailable",
        "The job store is unreachable; retry shortly.",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
    )


async def _redis_full(request: Request, exc: Exception) -> JSONResponse:
    # Redis runs with `noeviction`: when it is full it refuses writes rather than dropping jobs.
    logger.error("Redis is full on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "service_unavailable",
        "The job store is full; retry later.",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
    )


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("storage unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "storage_unavailable",
        "Object storage is unreachable; retry shortly.",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged with the trace here; the client gets a sentence, never the trace.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "An unexpected error occurred.")


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through the one error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(FieldError, _field_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    # redis-py's TimeoutError and ConnectionError cover refused, reset and unresponsive servers.
    app.add_exception_handler(redis.exceptions.ConnectionError, _redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _redis_down)
    app.add_exception_handler(redis.exceptions.OutOfMemoryError, _redis_full)
    app.add_exception_handler(StorageUnavailable, _storage_down)
    app.add_exception_handler(Exception, _unexpected)
