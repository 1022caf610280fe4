"""Keep bearer material out of the gateway's logs.

A signed result URL (``/v1/files/...?expires=...&signature=...``) is a credential for as long as
it is valid, and uvicorn's access log writes every request's path and query. The filter here
rewrites each access-log record so the signature reads ``signature=REDACTED``.
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactSignatures", "install_log_redaction", "redact"]

# Every query parameter that carries a secret: our own signature, S3's presigned ones.
_SECRET_PARAMS = re.compile(
    r"(?P<name>(?:^|[?&;])(?:signature|x-amz-signature|x-amz-security-token|x-amz-credential)=)"
    r"[^&;#\s\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the values of secret query parameters replaced by ``REDACTED``."""
    # Every secret parameter is "name=value": text without "=" (the client address, the method,
    # a path without a query: nearly every access-log argument) is returned without a regex scan.
    if "=" not in text:
        return text
    return _SECRET_PARAMS.sub(r"\g<name>REDACTED", text)


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
