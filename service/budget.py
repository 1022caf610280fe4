"""Byte budgets for the inputs a request brings: one per request, one for the whole process.

A request's inputs are its uploaded file parts, its ``data:`` URLs, what its URLs fetch and the
``s3://`` objects it names: masks, condition images, frames and videos alike. Before this budget a
1.2 KB JSON edit could name one 20 MB image URL 25 times (photo, 16 masks, 8 condition images)
and make the gateway fetch and hold half a gigabyte, and four such requests at once held 1.4 GB:
the body limits and upload slots of ``service.middleware`` count request bodies, and a URL costs
the body a few dozen bytes.

So every input's bytes are charged as they arrive (a fetched body chunk by chunk) to

- the request's :class:`RequestBudget` (``max_request_input_bytes``): past it the request is
  refused with 413, naming the field whose bytes crossed it;
- the process's :class:`InflightBytes` (``max_inflight_input_bytes``), shared by every request in
  flight: past it the request is refused with 503 and ``Retry-After``, since the same request
  fits once others finish.

A request's bytes are given back to the process when it ends (:meth:`RequestBudget.release`),
whether it was accepted or refused. The same reference named twice in one request is read once
and charged once (``service.intake``). Charges come from the event loop and from the threads that
fetch, so both counters take a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from service.errors import ApiError, FieldError

__all__ = ["InflightBytes", "RequestBudget", "field_path"]

# Seconds a client refused for want of process-wide room should wait.
_BUSY_RETRY_AFTER = 5


def field_path(loc: Sequence[str | int]) -> str:
    """``body.control.mask.regions.3.source`` as the error sentences write it (no ``body``)."""
    return ".".join(str(part) for part in loc if part != "body") or "request"


class InflightBytes:
    """The input bytes every request in this process holds together, up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """The bytes held now."""
        return self._held

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (holding nothing) when that would pass the limit."""
        with self._lock:
            if self._held + size > self.limit:
                return False
            self._held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._held -= size


class RequestBudget:
    """One request's input bytes, charged against its own limit and the process's."""

    def __init__(self, limit: int, process: InflightBytes) -> None:
        self.limit = limit
        self.process = process
        self._charged = 0
        self._lock = threading.Lock()

    @property
    def charged(self) -> int:
        """The bytes this request has charged so far."""
        return self._charged

    def charge(self, size: int, loc: Sequence[str | int], what: str) -> None:
        """Count ``size`` more bytes of the input at ``loc``: a 413 past the request's limit, a
        503 past the process's (charging nothing in either case)."""
        with self._lock:
            total = self._charged + size
            if total > self.limit:
                raise _over_request_budget(total, self.limit, loc, what)
            if not self.process.take(size):
                raise _process_busy(self.process.limit, loc)
            self._charged = total

    def release(self) -> None:
        """Give every byte charged back to the process (the request has ended)."""
        with self._lock:
            self.process.give_back(self._charged)
            self._charged = 0


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}".removesuffix(".0") + " MiB"


def _over_request_budget(total: int, limit: int, loc: Sequence[str | int], what: str) -> ApiError:
    # The total is what had arrived when the limit was crossed: a fetch stops right there.
    message = (
        f"The request's inputs reach {_mib(total)} with the {what} at {field_path(loc)}; a "
        f"request may bring at most {_mib(limit)} of images, masks, frames and videos in all."
    )
    detail = FieldError(
        loc,
        f"{what} takes the request's inputs past {_mib(limit)} in all",
        "request_inputs_too_large",
    )
    return ApiError(413, "payload_too_large", message, details=[detail.detail])


def _process_busy(limit: int, loc: Sequence[str | int]) -> ApiError:
    message = (
        f"The gateway holds its limit of {limit // (1024 * 1024)} MiB of inputs for requests in "
        f"flight and cannot take {field_path(loc)} now; retry shortly."
    )
    return ApiError(
        503,
        "inputs_busy",
        message,
        details=[FieldError(loc, message, "inputs_busy").detail],
        headers={"Retry-After": str(_BUSY_RETRY_AFTER)},
    )
