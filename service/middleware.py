"""A request body size limit, enforced on the declared length and on the bytes that arrive."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, before they are buffered or spooled to disk."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            "payload_too_large",
            f"The request body is larger than {self.max_bytes} bytes.",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    error = self._too_large()
                    response = error_response(error.status, error.code, error.message)
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the handler's body read; the ApiError handler answers 413.
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)
