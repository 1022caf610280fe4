"""Job ids: UUIDv7 strings, so sorting ids as text sorts jobs by creation time.

Python gains ``uuid.uuid7`` only in 3.14; this is the RFC 9562 layout with the optional
12-bit sub-millisecond counter ("method 1"), which keeps ids made in the same millisecond by one
process in order. Ids from different processes in the same millisecond are ordered arbitrarily,
which is all the listing needs.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from datetime import datetime, timezone

__all__ = ["is_job_id", "new_id", "id_datetime"]

_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_id() -> str:
    """A new UUIDv7 as its canonical lowercase string."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            # Start the counter low but random, leaving room to count up within the millisecond.
            _counter = int.from_bytes(os.urandom(2), "big") & 0x7FF
        else:
            # Same millisecond (or the clock stepped back): keep the previous time and count on.
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1
                ms = _last_ms
                _counter = 0
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"  # formatted by hand: uuid.UUID is several times slower
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_job_id(value: str) -> bool:
    """Whether ``value`` looks like an id made by :func:`new_id`."""
    return bool(_ID_RE.match(value))


def id_datetime(job_id: str) -> datetime:
    """The creation time (millisecond precision, UTC) embedded in a UUIDv7."""
    ms = uuid.UUID(job_id).int >> 80
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
