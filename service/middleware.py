"""Request body limits, enforced while the body streams in rather than after it is buffered.

A submission needs a few kilobytes unless it carries images inline as ``data:`` URLs, so each
body is held to a small limit (``max_json_bytes``) and earns one image's allowance (the base64
size of ``max_image_bytes``) for every ``"data:`` string seen so far, up to the route's number of
inline images. The rule looks at the bytes, not at field names, so a route that adds image fields
only declares how many it takes (``INLINE_IMAGES``). A multipart body earns one raw image for
every file part header (``filename=``) seen so far, up to the route's number of file parts
(``FILE_PARTS``), plus the same allowance for inline images in its ``params`` part.

Bodies past the small limit are large uploads; only ``max_concurrent_large_uploads`` of them are
read at once. The others wait, unread, for a slot (TCP holds their bytes back) and are answered
503 if none frees within ``large_upload_wait_seconds``: the gateway's memory stays bounded
whatever the number of clients.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from masactrl_jobs.schema import MAX_MASK_REGIONS, MAX_SEQUENCE_FRAMES, MAX_TARGETS
from service.errors import ApiError, error_response

__all__ = [
    "FILE_PARTS",
    "INLINE_IMAGES",
    "VIDEO_ROUTES",
    "BodyLimitMiddleware",
    "BodyLimits",
    "encoded_image_bytes",
]

# How many inline images a route's body may carry: (method, path) -> count.
# Edits: the photo, mask pairs and one layout image per target; syntheses add a source layout.
INLINE_IMAGES: dict[tuple[str, str], int] = {
    ("POST", "/v1/edits"): 1 + 2 * MAX_MASK_REGIONS + MAX_TARGETS,
    ("POST", "/v1/syntheses"): 2 * MAX_MASK_REGIONS + MAX_TARGETS + 1,
    # Sequences: the source photo and the frames (or one video, up to an image's allowance).
    ("POST", "/v1/sequences"): 1 + MAX_SEQUENCE_FRAMES,
}
# How many image file parts a route's multipart body may carry: (method, path) -> count.
# Edits: the photo and one condition image per target; sequences: the photo and every frame
# (or one video).
FILE_PARTS: dict[tuple[str, str], int] = {
    ("POST", "/v1/edits"): 1 + MAX_TARGETS,
    ("POST", "/v1/sequences"): 1 + MAX_SEQUENCE_FRAMES,
}
# Routes whose file parts may be a video: each part there earns a video's size, not an image's
# (the intake still holds every frame to the image limit and a video to the video limit).
VIDEO_ROUTES = frozenset({("POST", "/v1/sequences")})
# Multipart boundaries and part headers, on top of the parts themselves.
_MULTIPART_OVERHEAD = 16 * 1024
_MARKER = b'"data:'
_FILE_MARKER = b"filename="
# Longer than either marker less one byte: a marker split across two chunks is still seen.
_TAIL = max(len(_MARKER), len(_FILE_MARKER)) - 1
# Seconds a client refused for lack of an upload slot should wait.
_BUSY_RETRY_AFTER = 5


def encoded_image_bytes(max_image_bytes: int) -> int:
    """Room for one image as a base64 ``data:`` URL: 4/3 of it, line breaks and the prefix."""
    # MIME-style base64 breaks lines every 76 characters (2.6% more); decode_data_url accepts it.
    return (max_image_bytes + 2) // 3 * 4 * 103 // 100 + 1024


@dataclass(frozen=True)
class BodyLimits:
    """The sizes the middleware enforces."""

    small: int  # a body without inline images
    image: int  # the allowance for each inline image (base64)
    raw_image: int  # a multipart image file part
    ceiling: int  # no body is ever larger
    max_large_uploads: int  # bodies past ``small`` read at the same time
    slot_wait_seconds: float  # how long a large upload waits for its turn
    raw_video: int = 0  # a multipart video file part, on routes that take one

    def inline_images(self, method: str, path: str) -> int:
        """How many inline images the route takes."""
        return INLINE_IMAGES.get((method, path.rstrip("/") or "/"), 0)

    def file_parts(self, method: str, path: str, multipart: bool) -> int:
        """How many image file parts the route takes (none unless the body is multipart)."""
        return FILE_PARTS.get((method, path.rstrip("/") or "/"), 0) if multipart else 0

    def file_part_bytes(self, method: str, path: str) -> int:
        """What one file part of this route may earn."""
        if (method, path.rstrip("/") or "/") in VIDEO_ROUTES:
            return max(self.raw_image, self.raw_video)
        return self.raw_image

    def route_max(self, method: str, path: str, multipart: bool) -> int:
        """The largest body this route can accept."""
        files = self.file_parts(method, path, multipart)
        most = self.small + self.inline_images(method, path) * self.image
        if files:
            most += files * self.file_part_bytes(method, path) + _MULTIPART_OVERHEAD
        return min(most, self.ceiling)


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f}".removesuffix(".0") + " MiB"
    if n >= 1024:
        return f"{n / 1024:.1f}".removesuffix(".0") + " KiB"
    return f"{n} bytes"


def _declared_too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"The request body is {_size(size)}; this route accepts at most {_size(limit)}.",
    )


def _too_large(limit: int, inline_images: int, files: int, declared: int | None) -> ApiError:
    parts = [f"{files} image file part{'s' if files > 1 else ''}"] if files else []
    if inline_images:
        parts.append(f"{inline_images} inline image{'s' if inline_images > 1 else ''}")
    what = " and ".join(parts) if parts else "no inline images"
    # The real size is known only when the client declared it; a chunked body is cut short.
    if declared is not None:
        message = f"The request body is {_size(declared)}; with {what} this route accepts at most"
    else:
        message = f"The request body is too large; with {what} this route accepts at most"
    return ApiError(413, "payload_too_large", f"{message} {_size(limit)}.")


def _busy() -> ApiError:
    return ApiError(
        503,
        "uploads_busy",
        "Too many large uploads are in progress; retry shortly.",
        headers={"Retry-After": str(_BUSY_RETRY_AFTER)},
    )


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(error.status, error.code, error.message, headers=error.headers)
    await response(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over their route's limit and 503 past the large-upload cap, both before
    the bytes are buffered (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.max_large_uploads)

    async def _take_slot(self) -> None:
        if not self.slots.locked():
            await self.slots.acquire()  # a free slot: taken at once, even with no wait allowed
            return
        try:
            await asyncio.wait_for(self.slots.acquire(), self.limits.slot_wait_seconds)
        except TimeoutError:
            raise _busy() from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        declared: int | None = None
        multipart = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                # More than 18 digits is over any limit (and past int()'s digit cap).
                valid = value.isdigit() and len(value) <= 18
                declared = int(value) if valid else limits.ceiling + 1
            elif name == b"content-type":
                multipart = value.lower().startswith(b"multipart/form-data")
        images = limits.inline_images(scope["method"], scope["path"])
        files = limits.file_parts(scope["method"], scope["path"], multipart)
        route_max = limits.route_max(scope["method"], scope["path"], multipart)
        part_bytes = limits.file_part_bytes(scope["method"], scope["path"])
        base = limits.small + (_MULTIPART_OVERHEAD if files else 0)
        if declared is not None and declared > route_max:
            await _answer(_declared_too_large(declared, route_max), scope, receive, send)
            return

        received = 0
        inline = 0
        file_headers = 0
        tail = b""
        holds_slot = False

        if declared is not None and declared > limits.small:
            try:
                await self._take_slot()
            except ApiError as error:
                await _answer(error, scope, receive, send)
                return
            holds_slot = True

        async def limited_receive() -> Message:
            nonlocal received, inline, file_headers, tail, holds_slot
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            received += len(chunk)
            # The tail carries a marker split across two chunks; it is shorter than either
            # marker, so no marker is counted twice.
            window = (tail + chunk).lower()
            inline += window.count(_MARKER)
            if files:
                file_headers += window.count(_FILE_MARKER)
            tail = window[-_TAIL:]
            earned_inline, earned_files = min(inline, images), min(file_headers, files)
            earned = earned_inline * limits.image + earned_files * part_bytes
            allowed = min(base + earned, route_max)
            if received > allowed:
                # Raised inside the handler's body read; the ApiError handler answers 413.
                raise _too_large(allowed, earned_inline, earned_files, declared)
            if received > limits.small and not holds_slot:
                await self._take_slot()
                holds_slot = True
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if holds_slot:
                self.slots.release()
