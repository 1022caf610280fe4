"""The Redis job store shared by the gateway (asyncio) and the workers (threads).

Every state change is one Lua script (or one atomic command), so a job record, its indexes, its
queue entry, its event stream and its webhook bookkeeping never disagree, whichever process dies
between two calls. Workers and the gateway reach Redis only through the store's operations.

One concern per module:

- ``keys.py``: every Redis key name the system uses.
- ``lua/*.lua`` and ``scripts.py``: the scripts, shipped as package data.
- ``records.py``: the job record, its typed parts, and the operations' results.
- ``render.py``: the public job object the API serves.
- ``operation.py``: how an operation is written once and bound to both front ends.
- ``operations.py`` and ``worker_operations.py``: the operations.
- ``wire.py``: batching concurrent script calls into one pipeline (the gateway's fast path).
- ``connection.py``: where Redis is (a URL or a Sentinel master) and how clients connect and retry.
- ``fronts.py``: :class:`JobStore` and :class:`AsyncJobStore`.
"""

from masactrl_jobs.store.fronts import AsyncJobStore, JobStore
from masactrl_jobs.store.keys import Keys
from masactrl_jobs.store.records import (
    TERMINAL_EVENTS,
    CancelResult,
    ClaimResult,
    CreateResult,
    ErrorRecord,
    FinishResult,
    ImageRecord,
    JobEvent,
    JobRecord,
    OutputRecord,
    PreviewImageRecord,
    PreviewRecord,
    ProgressRecord,
    ProgressResult,
    RateLimitResult,
    StartResult,
)

__all__ = [
    "TERMINAL_EVENTS",
    "AsyncJobStore",
    "CancelResult",
    "ClaimResult",
    "CreateResult",
    "ErrorRecord",
    "FinishResult",
    "ImageRecord",
    "JobEvent",
    "JobRecord",
    "JobStore",
    "Keys",
    "OutputRecord",
    "PreviewImageRecord",
    "PreviewRecord",
    "ProgressRecord",
    "ProgressResult",
    "RateLimitResult",
    "StartResult",
]
