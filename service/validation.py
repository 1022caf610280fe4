"""The gateway's own checks of a submission, the same for every job kind: the webhook URL.

What a kind checks (control, size, masks, conditions, frames) is the kind's own
(``masactrl_jobs.kinds``), written against the shared rules of ``masactrl_jobs.control``.
"""

from __future__ import annotations

import httpx

from masactrl_jobs import netguard
from service.errors import FieldError

__all__ = ["check_webhook_url"]


def check_webhook_url(url: str, *, allow_loopback_http: bool) -> FieldError | None:
    """The checks that need no DNS, at submission; delivery resolves and checks again."""
    loc = ("body", "webhook", "url")
    try:
        literal = netguard.check_url_syntax(url, allow_loopback_http=allow_loopback_http)
    except netguard.UnsafeURL as exc:
        return FieldError(loc, str(exc), "unsafe_url")
    # Plain http only to a loopback literal in development: a name is resolved only at delivery.
    if httpx.URL(url).scheme == "http" and literal is None:
        return FieldError(loc, "must be an https:// URL", "unsafe_url")
    return None
