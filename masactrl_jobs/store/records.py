"""A job as stored, its typed parts, and what each store operation returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from masactrl_jobs.schema import ImageRole, JobInput, JobKind, JobStatus, ProgressPhase
from masactrl_jobs.store.render import public_job

__all__ = [
    "TERMINAL_EVENTS",
    "CancelResult",
    "ClaimResult",
    "CreateResult",
    "ErrorRecord",
    "FinishResult",
    "ImageRecord",
    "JobEvent",
    "JobRecord",
    "OutputRecord",
    "PreviewImageRecord",
    "PreviewRecord",
    "ProgressRecord",
    "ProgressResult",
    "RateLimitResult",
    "StartResult",
]

# Event names in a job's stream (and on the SSE wire) that end it.
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled", "expired"})


def text(value: Any) -> str:
    """A Redis reply item as text, whether or not the client decodes replies."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ProgressRecord:
    """How far the running phase of a job has come."""

    phase: ProgressPhase
    step: int
    total: int
    frames_done: int | None = None  # sequences only

    @property
    def fraction(self) -> float:
        return min(1.0, round(self.step / max(self.total, 1), 4))

    def to_json(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"phase": self.phase.value, "step": self.step, "total": self.total}
        if self.frames_done is not None:
            fields["frames_done"] = self.frames_done
        return {**fields, "fraction": self.fraction}


@dataclass(frozen=True)
class ImageRecord:
    """One output image by storage key (URLs are presigned only when the job is shown)."""

    role: ImageRole
    prompt: str
    key: str
    width: int
    height: int


@dataclass(frozen=True)
class PreviewImageRecord:
    """One image of a live preview by storage key: what it previews (role, index) and where."""

    role: ImageRole
    index: int
    key: str


@dataclass(frozen=True)
class PreviewRecord:
    """The latest live preview of a job: after denoising step ``step`` of ``steps``."""

    step: int
    steps: int
    images: list[PreviewImageRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "steps": self.steps,
            "images": [{"role": i.role.value, "index": i.index, "key": i.key} for i in self.images],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreviewRecord:
        images = [
            PreviewImageRecord(ImageRole(i["role"]), int(i["index"]), str(i["key"]))
            for i in data.get("images", [])
        ]
        return cls(int(data["step"]), int(data["steps"]), images)


@dataclass(frozen=True)
class OutputRecord:
    images: list[ImageRecord]


@dataclass(frozen=True)
class ErrorRecord:
    """Why a job failed: a stable ``code`` and a one-sentence ``message``."""

    code: str
    message: str


def _json_or_none(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


def _float_or_none(raw: str | None) -> float | None:
    return float(raw) if raw else None


def _progress(raw: str | None) -> ProgressRecord | None:
    data = _json_or_none(raw)
    if not data:
        return None
    frames = data.get("frames_done")
    return ProgressRecord(
        ProgressPhase(data["phase"]),
        int(data["step"]),
        int(data["total"]),
        int(frames) if frames is not None else None,
    )


def _output(raw: str | None) -> OutputRecord | None:
    data = _json_or_none(raw)
    if data is None:
        return None
    images = [
        ImageRecord(ImageRole(i["role"]), i["prompt"], i["key"], int(i["width"]), int(i["height"]))
        for i in data.get("images", [])
    ]
    return OutputRecord(images)


def _preview(raw: str | None) -> PreviewRecord | None:
    data = _json_or_none(raw)
    return PreviewRecord.from_json(data) if data else None


def _error(raw: str | None) -> ErrorRecord | None:
    data = _json_or_none(raw)
    return ErrorRecord(data["code"], data["message"]) if data else None


@dataclass
class JobRecord:
    """A job as stored: what the workers read and the gateway renders with :meth:`to_public`.

    ``webhook_secrets`` are the tenant's signing secrets at submission time (newest first); they
    never appear in the public object.
    """

    id: str
    tenant: str
    kind: JobKind
    model: str
    status: JobStatus
    created_at: float
    input: JobInput
    started_at: float | None = None
    completed_at: float | None = None
    progress: ProgressRecord | None = None
    preview: PreviewRecord | None = None
    output: OutputRecord | None = None
    error: ErrorRecord | None = None
    metrics: dict[str, Any] | None = None
    attempts: int = 0
    webhook: dict[str, Any] | None = None
    webhook_secrets: list[str] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    request_hash: str = ""
    worker_id: str | None = None
    queue_position: int | None = None
    # The queue policy's inputs: priority within the tenant's share, the deadline to start (Unix
    # seconds), and the retry links.
    priority: int = 0
    deadline_at: float | None = None
    retry_of: str | None = None
    retried_by: str | None = None
    # Sentences about the input the worker that ran the job wrote (e.g. prompt words the model
    # does not know); the job still ran.
    warnings: list[str] = field(default_factory=list)
    # ``input`` as the store just wrote it (JSON), on a record it created: what the new job's
    # object embeds, so answering the submission does not serialize the input a second time.
    # Empty on records read back (stored by any version, they are serialized afresh).
    input_json: str = field(default="", repr=False, compare=False)

    @classmethod
    def from_hash(cls, raw: dict[Any, Any], rank: int = -1) -> JobRecord:
        """Parse a record from its Redis hash (and its 0-based queue rank, -1 when not queued)."""
        h = {text(k): text(v) for k, v in raw.items()}
        status = JobStatus(h["status"])
        deliveries = [json.loads(line) for line in h.get("deliveries", "").splitlines() if line]
        return cls(
            id=h["id"],
            tenant=h["tenant"],
            kind=JobKind(h["kind"]),
            model=h["model"],
            status=status,
            created_at=float(h["created_at"]),
            input=JobInput.model_validate_json(h["input"]),
            started_at=_float_or_none(h.get("started_at")),
            completed_at=_float_or_none(h.get("completed_at")),
            progress=_progress(h.get("progress")),
            preview=_preview(h.get("preview")),
            output=_output(h.get("output")),
            error=_error(h.get("error")),
            metrics=_json_or_none(h.get("metrics")),
            attempts=int(h.get("attempts") or 0),
            webhook=_json_or_none(h.get("webhook")),
            webhook_secrets=_json_or_none(h.get("webhook_secrets")) or [],
            deliveries=deliveries,
            cancel_requested=h.get("cancel_requested") == "1",
            request_hash=h.get("request_hash", ""),
            worker_id=h.get("worker_id") or None,
            queue_position=rank + 1 if status is JobStatus.queued and rank >= 0 else None,
            warnings=_json_or_none(h.get("warnings")) or [],
            priority=int(h.get("priority") or 0),
            deadline_at=_float_or_none(h.get("deadline_at")),
            retry_of=h.get("retry_of") or None,
            retried_by=h.get("retried_by") or None,
        )

    @property
    def input_keys(self) -> list[str]:
        """Every storage key this job reads: the image, any mask and condition images."""
        keys = [self.input.image] if self.input.image else []
        for region in self.input.control.mask.regions or []:
            keys += [region.source, region.target]
        condition = self.input.condition
        if condition is not None:
            keys += condition.images
            keys += [condition.source_image] if condition.source_image else []
        return keys

    # The job object: output keys become presigned URLs made by ``url_for(key)``.
    to_public = public_job


@dataclass(frozen=True)
class CreateResult:
    """``outcome``: ``created``; ``duplicate`` (idempotency key seen: ``job_id`` is the original,
    ``request_hash`` its body hash); ``full`` (the model's queue is at its limit);
    ``rate_limited`` (the tenant's bucket is empty: retry in ``retry_after`` seconds); or, for a
    retry, ``missing`` (no such job of the tenant), ``not_retryable`` (``previous`` is its
    status) or ``retried`` (``job_id`` is the job that already retries it)."""

    outcome: str
    job_id: str | None = None
    request_hash: str | None = None
    record: JobRecord | None = None
    retry_after: float = 0.0
    previous: str | None = None


@dataclass(frozen=True)
class ClaimResult:
    """What a worker's message decided (``claim.lua``): ``started`` (run ``job_id``, whose lease
    this worker now holds; ``attempts`` counts this run), ``none`` (nothing to start: drop the
    message) or ``leased`` (``job_id`` holds another worker's lease: drop the message).
    ``ended``: jobs the decision ended on the way (expired, or cancelled while their worker was
    gone), whose terminal webhooks the caller sends."""

    outcome: str
    job_id: str | None = None
    attempts: int = 0
    ended: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartResult:
    """``outcome``: ``started`` (run it; ``attempts`` counts this run), ``missing`` (no such
    job: expired or never created), ``terminal`` (already ended: drop the message) or
    ``cancel_requested`` (cancelled while running elsewhere: call ``finish_canceled``)."""

    outcome: str
    attempts: int = 0
    status: str | None = None


@dataclass(frozen=True)
class ProgressResult:
    updated: bool
    cancel_requested: bool


@dataclass(frozen=True)
class FinishResult:
    """``outcome``: ``ok``, ``missing``, ``conflict`` (``previous`` says the status found) or
    ``fenced`` (a later attempt of the job has started: this one may change nothing)."""

    outcome: str
    previous: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class CancelResult:
    """``outcome``: ``canceled`` (was queued), ``flagged`` (running: the worker stops at its next
    step), ``conflict`` (already terminal; ``previous`` is its status) or ``missing``."""

    outcome: str
    previous: str | None = None


@dataclass(frozen=True)
class RateLimitResult:
    allowed: bool
    retry_after: float
    remaining: float


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream; ``id`` is the stream id, usable as an SSE id."""

    id: str
    event: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS
