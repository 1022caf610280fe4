"""Keeping bearer material out of worker logs.

Webhook URLs may carry their receiver's token in the query string (``?token=...``), and result
URLs are signed in theirs; httpx logs every request's URL at INFO, and error messages quote URLs.
A log line outlives the token's purpose and reaches people the token was never meant for, so a
worker process formats each record once, at creation, with every URL's query string and userinfo
replaced. Doing it in the record factory covers every logger and every handler (Celery installs
its own), without relying on each call site to remember.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["install_log_redaction", "redact_urls"]

REDACTED = "[redacted]"

# scheme://[userinfo@]host[/path][?query][#fragment]; the query and fragment run to whitespace or
# a closing quote/bracket.
_URL = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@'\"<>]*@)?"
    r"(?P<rest>[^\s?#'\"<>]*)(?P<query>[?#][^\s'\"<>)\]]*)?"
)


def _redact(match: re.Match[str]) -> str:
    query = match.group("query")
    hidden = ("?" + REDACTED) if query else ""
    return f"{match.group('scheme')}{match.group('rest')}{hidden}"


def redact_urls(text: str) -> str:
    """``text`` with the userinfo, query and fragment of every URL replaced."""
    if "://" not in text:
        return text
    return _URL.sub(_redact, text)


_installed = False


def install_log_redaction() -> None:
    """Redact URLs in every log record this process creates from now on (idempotent)."""
    global _installed
    if _installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:
            return record  # a broken format string: let logging report it as usual
        redacted = redact_urls(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
