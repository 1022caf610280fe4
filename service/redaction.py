"""Keep bearer material out of the gateway's logs.

A signed result URL (``/v1/files/...?expires=...&signature=...``) is a credential for as long as
it is valid, and uvicorn's access log writes every request's path and query. The filter here
rewrites each access-log record so the signature reads ``signature=REDACTED``.

A query parameter's name is matched after percent-decoding it, as the server reads it:
``%73ignature=...`` is the signature to Starlette (and downloads the file), so it is redacted too.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

__all__ = ["RedactSignatures", "install_log_redaction", "redact"]

# Every query parameter that carries a secret: our own signature, S3's presigned ones.
_SECRET_NAMES = frozenset(
    ("signature", "x-amz-signature", "x-amz-security-token", "x-amz-credential")
)
# One "name=value" pair of a query (or of text that starts with one).
_PAIR = re.compile(r"(?P<lead>^|[?&;])(?P<name>[^?&;=#\s\"]+)=(?P<value>[^&;#\s\"]*)")
# Decoding a name this many times reaches any name a client could mean; past that, redact.
_MAX_DECODINGS = 3


def _is_secret(name: str) -> bool:
    for _ in range(_MAX_DECODINGS + 1):
        if name.strip().lower() in _SECRET_NAMES:
            return True
        decoded = unquote_plus(name)
        if decoded == name:
            return False
        name = decoded
    return True  # still encoded after that many decodings: redact rather than guess


def _redact_pair(match: re.Match[str]) -> str:
    if not _is_secret(match.group("name")):
        return match.group(0)
    return f"{match.group('lead')}{match.group('name')}=REDACTED"


def redact(text: str) -> str:
    """``text`` with the values of secret query parameters replaced by ``REDACTED``."""
    # Every secret parameter is "name=value": text without "=" (the client address, the method,
    # a path without a query: nearly every access-log argument) is returned without a regex scan.
    if "=" not in text:
        return text
    return _PAIR.sub(_redact_pair, text)


class RedactSignatures(logging.Filter):
    """Redacts secret query parameters in a record's arguments (uvicorn passes the path there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Attach the filter to uvicorn's access logger, once per process."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSignatures) for f in access.filters):
        access.addFilter(RedactSignatures())
