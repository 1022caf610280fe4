"""Browser hardening headers on every HTML page the gateway serves (the playground, /docs, /redoc,
and any ``.html`` among the static assets).

A page gets ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` (a page's URL
never leaks to the object store or elsewhere) and a Content Security Policy that forbids framing
(``frame-ancestors 'none'``, against clickjacking). A page that sends its own policy (the
playground's) keeps it; ``frame-ancestors 'none'`` is added to it unless it already says where it
may be framed. The middleware looks only at each response's start message and only at HTML, so
the API's JSON answers pass through untouched.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PAGE_HEADERS", "FRAME_ANCESTORS", "PageHeadersMiddleware", "with_frame_ancestors"]

PAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
FRAME_ANCESTORS = "frame-ancestors 'none'"


def with_frame_ancestors(policy: str | None) -> str:
    """``policy`` with ``frame-ancestors 'none'`` added, unless it already has that directive."""
    if not policy or not policy.strip(" ;"):
        return FRAME_ANCESTORS
    directives = [d.strip() for d in policy.split(";") if d.strip()]
    if any(d.split()[0].lower() == "frame-ancestors" for d in directives):
        return policy
    return "; ".join([*directives, FRAME_ANCESTORS])


class PageHeadersMiddleware:
    """Adds :data:`PAGE_HEADERS` and the framing policy to ``text/html`` responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").lower().startswith("text/html"):
                    for name, value in PAGE_HEADERS.items():
                        headers[name] = value
                    policy = headers.get("content-security-policy")
                    headers["Content-Security-Policy"] = with_frame_ancestors(policy)
            await send(message)

        await self.app(scope, receive, send_with_headers)
