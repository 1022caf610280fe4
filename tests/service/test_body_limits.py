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
    content_type: bytes = b"application/json",
) -> tuple[int, dict[str, Any]]:
    """POST ``chunks`` to /v1/edits; the last chunk waits for ``gate`` when given."""
    headers = [(b"content-type", content_type)]
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


MULTIPART = b"multipart/form-data; boundary=b"


def file_part(name: str, size: int) -> list[bytes]:
    """A multipart file part, its header split across two chunks."""
    return [
        f'--b\r\nContent-Disposition: form-data; name="{name}"; file'.encode(),
        b'name="x.png"\r\n\r\n',
        b"P" * size + b"\r\n",
    ]


def test_each_file_part_earns_one_raw_image_up_to_the_routes_parts() -> None:
    from service.middleware import FILE_PARTS

    app = make_app(limits(raw_image=40_000, max_large_uploads=5))
    three = [*file_part("image", 40_000), *(file_part("condition_image", 40_000) * 2), b"--b--"]
    status, body = asyncio.run(call(app, three, content_type=MULTIPART))
    assert status == 200 and body["read"] > 120_000
    # The same bytes in one file part earn one raw image only.
    one = [*file_part("image", 120_000), b"--b--"]
    status, body = asyncio.run(call(app, one, content_type=MULTIPART))
    assert status == 413 and "1 image file part" in body["error"]["message"]
    parts = FILE_PARTS[("POST", "/v1/edits")]
    many = [chunk for _ in range(parts + 2) for chunk in file_part("condition_image", 40_000)]
    status, body = asyncio.run(call(app, many, content_type=MULTIPART))
    assert status == 413 and f"{parts} image file parts" in body["error"]["message"]


def test_a_json_body_earns_nothing_for_file_part_headers() -> None:
    app = make_app(limits(raw_image=40_000, max_large_uploads=5))
    status, _ = asyncio.run(call(app, [b'{"x": "filename=', b"A" * 5000, b'"}']))
    assert status == 413
