"""The body-limit middleware on its own: route allowances, inline-image counting across chunks,
and the cap on large uploads read at once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import install_error_handlers
from service.middleware import BodyLimitMiddleware, BodyLimits

SMALL = 1000
IMAGE = 5000


def limits(**overrides: Any) -> BodyLimits:
    values: dict[str, Any] = {
        "small": SMALL,
        "image": IMAGE,
        "raw_image": 4000,
        "ceiling": 1_000_000,
        "max_large_uploads": 1,
        "slot_wait_seconds": 0.2,
    }
    values.update(overrides)
    return BodyLimits(**values)


def make_app(body_limits: BodyLimits) -> BodyLimitMiddleware:
    from fastapi import FastAPI

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/edits")
    async def read(request: Request) -> JSONResponse:
        return JSONResponse({"read": len(await request.body())})

    return BodyLimitMiddleware(app, body_limits)


async def call(
    app: BodyLimitMiddleware,
    chunks: list[bytes],
    *,
    declared: int | None = None,
    gate: asyncio.Event | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST ``chunks`` to /v1/edits; the last chunk waits for ``gate`` when given."""
    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/edits",
        "raw_path": b"/v1/edits",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("test", 1),
        "root_path": "",
    }
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if len(pending) == 1 and gate is not None:
            await gate.wait()
        if not pending:
            await asyncio.sleep(3600)  # a client that sends nothing more
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_plain_body_gets_the_small_limit() -> None:
    app = make_app(limits())
    status, body = asyncio.run(call(app, [b"x" * 600, b"x" * 600]))
    assert status == 413
    assert "no inline images" in body["error"]["message"]


def test_each_inline_image_earns_one_allowance_even_split_across_chunks() -> None:
    app = make_app(limits(max_large_uploads=5))
    # The marker arrives split over two chunks.
    head = [b'{"image": "da', b"ta:image/png;base64,"]
    status, body = asyncio.run(call(app, [*head, b"A" * 5000]))
    assert status == 200 and body["read"] == 5033
    status, body = asyncio.run(call(app, [*head, b"A" * 7000]))
    assert status == 413 and "1 inline image" in body["error"]["message"]


def test_a_declared_length_over_the_route_is_refused_at_once() -> None:
    app = make_app(limits(ceiling=2000))
    status, body = asyncio.run(call(app, [b"x"], declared=5000))
    assert status == 413
    assert body["error"]["message"] == (
        "The request body is 4.9 KiB; this route accepts at most 2 KiB."
    )


def test_large_uploads_past_the_cap_wait_then_get_503() -> None:
    app = make_app(limits())

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        gate = asyncio.Event()
        first = asyncio.create_task(call(app, [b'{"image": "data:', b"A" * 2000, b'"}'], gate=gate))
        await asyncio.sleep(0.05)  # the first holds the only slot, its last chunk held back
        second = await call(app, [b'{"image": "data:', b"A" * 2000, b'"}'])
        gate.set()
        return [await first, second]

    (first, second) = asyncio.run(scenario())
    assert second[0] == 503 and second[1]["error"]["code"] == "uploads_busy"
    assert first[0] == 200


@pytest.mark.parametrize("path", ["/v1/jobs", "/livez"])
def test_routes_without_images_take_no_image_allowance(path: str) -> None:
    assert limits().inline_images("POST", path) == 0
    assert limits().route_max("POST", path, multipart=False) == SMALL
