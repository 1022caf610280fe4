"""The public job schema: request bodies, the job object and the error body.

Requests forbid unknown fields so a typo (``guidence_scale``) is a 422, never a silently ignored
option. Checks that need the model catalog or several fields at once (``start_step < steps``,
sizes, mask words present in the prompts) live in the gateway, which reports them with the same
error body as field errors.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
)

from masactrl_jobs.shape import FamilyFeatures

__all__ = [
    "MAX_QUEUE_SECONDS",
    "PRIORITY_LIMIT",
    "RETRYABLE_STATUSES",
    "QueueOptions",
    "RetryCreate",
    "LORA_WEIGHT_LIMIT",
    "MAX_IMAGE_REF_CHARS",
    "MAX_LORAS",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_SEQUENCE_FRAMES",
    "MAX_STEPS",
    "MAX_TARGETS",
    "TERMINAL_STATUSES",
    "ConditionInput",
    "ConditionParams",
    "ConditionPublic",
    "ControlInput",
    "ControlParams",
    "DefaultControl",
    "EditCreate",
    "EditParams",
    "ErrorBody",
    "ErrorCode",
    "ErrorDetail",
    "ErrorInfo",
    "ImageRole",
    "JobError",
    "JobInput",
    "JobKind",
    "JobList",
    "JobMetrics",
    "JobOutput",
    "JobPreview",
    "JobProgress",
    "JobPublic",
    "JobStatus",
    "JobUrls",
    "JobWebhook",
    "LoraInput",
    "LoraParams",
    "LoraPublic",
    "MaskControl",
    "MaskMode",
    "MaskRegion",
    "ModelList",
    "ModelPublic",
    "OutputImage",
    "Preprocess",
    "PreviewImage",
    "ProgressPhase",
    "SequenceCondition",
    "SequenceCreate",
    "SequenceParams",
    "SynthesisCreate",
    "WebhookCreate",
    "WebhookDelivery",
    "WebhookEvent",
]

MAX_PROMPT_CHARS = 1000
MAX_TARGETS = 8
MAX_STEPS = 150
MAX_SEED = 2**32 - 1
MAX_MASK_REGIONS = 8
# The schema's ceiling on a sequence's frames; deployments lower it (the gateway's
# ``max_sequence_frames``, 120 by default).
MAX_SEQUENCE_FRAMES = 1000
# A base64 data: URL of the largest accepted image (20 MB) is about 27 MB of text; the gateway
# enforces the byte limit after decoding, this only stops absurd strings before they are parsed.
MAX_IMAGE_REF_CHARS = 64 * 1024 * 1024
# LoRA adapters a job may activate at once (each adds its cost to every adapted layer), and the
# bound on their weights (community adapters are used between about -2 and 2).
MAX_LORAS = 4
# Every tenant's priorities lie within these; each tenant's key narrows them (service config).
PRIORITY_LIMIT = 100
# The longest a job may wait to start when it sets a deadline.
MAX_QUEUE_SECONDS = 7 * 24 * 3600
LORA_WEIGHT_LIMIT = 4.0


class JobKind(str, Enum):
    edit = "edit"
    synthesis = "synthesis"
    # One source and K condition frames: K frames that keep the source's content.
    sequence = "sequence"


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    # Not started by its deadline (``start_by`` or ``max_queue_seconds``): it never runs.
    expired = "expired"

    def is_terminal(self) -> bool:
        """Whether the job has ended (no further transition is possible)."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.succeeded, JobStatus.failed, JobStatus.canceled, JobStatus.expired}
)
# Statuses a job can be retried from (``POST /v1/jobs/{id}/retry``).
RETRYABLE_STATUSES = frozenset({JobStatus.failed, JobStatus.canceled, JobStatus.expired})


class ProgressPhase(str, Enum):
    invert = "invert"
    denoise = "denoise"


class MaskMode(str, Enum):
    none = "none"
    manual = "manual"
    auto = "auto"


class WebhookEvent(str, Enum):
    started = "started"
    progress = "progress"
    completed = "completed"


class ErrorCode(str, Enum):
    """``error.code`` of a failed job: every failure a worker records has one of these."""

    invalid_input = "invalid_input"
    out_of_memory = "out_of_memory"
    storage_unavailable = "storage_unavailable"
    timeout = "timeout"
    worker_lost = "worker_lost"
    internal_error = "internal_error"


class ImageRole(str, Enum):
    source = "source"
    target = "target"
    # A layout condition image as the condition model received it (after any preprocessing).
    condition = "condition"
    # A sequence's frame k, and its animation (``sequence.mp4``, ``sequence.webp``).
    frame = "frame"
    animation = "animation"


class _Strict(BaseModel):
    # Requests say what they mean: no unknown fields, no "6" or true taken for a number, and no
    # NaN or infinity (which would otherwise be reported as out of range).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
# A target must say something: whitespace alone is rejected like the empty string.
NonEmptyPrompt = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")
]
ImageRef = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_IMAGE_REF_CHARS),
    Field(
        description=(
            "A `data:` URL (base64), an `https://` URL fetched by the gateway, an `s3://` URL "
            "of an object inside the service's own bucket, or the key of an earlier job's input "
            "as its job object shows it (`inputs/<sha256>.<ext>`), to run it again without "
            "sending the bytes."
        ),
        examples=["data:image/png;base64,iVBORw0KGgo..."],
    ),
]
Word = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"\S")]


class MaskRegion(_Strict):
    """A pair of masks: the region in the source and the matching region in the targets."""

    source: ImageRef
    target: ImageRef


class MaskControl(_Strict):
    """Restrict mutual self-attention to foreground regions (MasaCtrl's mask-guided variant)."""

    # Frozen, like ControlParams: one instance is the default of every request that omits it.
    model_config = ConfigDict(frozen=True)

    # Strict(False): in Python, strict mode takes only enum members; "manual" is fine too.
    mode: Annotated[MaskMode, Strict(False)] = MaskMode.none
    regions: list[MaskRegion] | None = Field(
        default=None,
        max_length=MAX_MASK_REGIONS,
        description="Mode `manual`: source/target mask images (white = foreground).",
    )
    source_word: Word | None = Field(
        default=None, description="Mode `auto`: a word of the source prompt naming the subject."
    )
    target_word: Word | None = Field(
        default=None, description="Mode `auto`: a word of every target prompt naming the subject."
    )
    threshold: float = Field(
        default=0.1, ge=0, le=1, description="Mode `auto`: cross-attention threshold for the mask."
    )


class ControlParams(_Strict):
    """Where mutual self-attention applies; omitted values take the model's defaults."""

    # A value, never changed once parsed. Frozen, one instance serves as the default of every
    # request that omits it: pydantic copies a default only when it cannot hash it, and the frozen
    # default (no lists set) hashes. A default_factory built this model and its mask on every
    # request, a third of parsing a submission's body.
    model_config = ConfigDict(frozen=True)

    start_step: int | None = Field(default=None, ge=0, le=MAX_STEPS)
    start_layer: int | None = Field(default=None, ge=0, le=1000)
    layers: list[Annotated[int, Field(ge=0, le=1000)]] | None = Field(
        default=None, max_length=1000, description="Explicit block indices (override start_layer)."
    )
    steps: list[Annotated[int, Field(ge=0, le=MAX_STEPS)]] | None = Field(
        default=None,
        max_length=MAX_STEPS,
        description="Explicit step indices (override start_step).",
    )
    mask: MaskControl = MaskControl()


# What the worker may make of a condition image first; ``masactrl_jobs.control`` checks it.
Preprocess = Literal["none", "canny"]


class ConditionParams(_Strict):
    """Layout guidance by one of the model's catalog condition models (ControlNet/T2I-Adapter)."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="A condition model name the chosen model lists in `GET /v1/models`."
    )
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=MAX_TARGETS,
        description="One condition image per target prompt, in order, or one for all targets.",
    )
    source_image: ImageRef | None = Field(
        default=None, description="Syntheses only: a condition image for the source too."
    )
    scale: float = Field(default=1.0, description="Weight of the condition, at least 0.")
    start: float = Field(default=0.0, description="Fraction of the steps where it starts, 0..1.")
    end: float = Field(default=1.0, description="Fraction of the steps where it ends, 0..1.")
    preprocess: Preprocess = Field(
        default="none",
        description="`canny`: the worker turns each image into an edge map first; `none`: the "
        "images are maps already (pose or depth maps made elsewhere).",
    )


class LoraParams(_Strict):
    """A LoRA adapter of the model's catalog entry (``GET /v1/models`` lists them)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    weight: float | None = Field(
        default=None,
        ge=-LORA_WEIGHT_LIMIT,
        le=LORA_WEIGHT_LIMIT,
        description="Scale of the adapter; default: the catalog's weight for it.",
    )


def _distinct_loras(loras: list[LoraParams]) -> list[LoraParams]:
    names = [lora.name for lora in loras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"each LoRA adapter may be named once; repeated: {', '.join(repeated)}")
    return loras


Loras = Annotated[
    list[LoraParams],
    Field(
        max_length=MAX_LORAS,
        description=f"LoRA adapters active for this job, at most {MAX_LORAS}.",
    ),
    AfterValidator(_distinct_loras),
]


class WebhookCreate(_Strict):
    """Where to POST signed job events (Standard Webhooks), and which ones."""

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    events: list[Annotated[WebhookEvent, Strict(False)]] = Field(
        default_factory=lambda: list(WebhookEvent), min_length=1, max_length=3
    )


class QueueOptions(_Strict):
    """Where a job stands in its model's queue: its priority and its deadline to start."""

    priority: int = Field(
        default=0,
        ge=-PRIORITY_LIMIT,
        le=PRIORITY_LIMIT,
        description="Higher starts first among this tenant's queued jobs for the model; equal "
        "priorities start in submission order. Each API key allows a range (default 0..0).",
    )
    start_by: Annotated[AwareDatetime, Strict(False)] | None = Field(
        default=None,
        description="RFC 3339 time: a job no worker has started by then ends `expired` and "
        "never runs. Not with `max_queue_seconds`.",
    )
    max_queue_seconds: int | None = Field(
        default=None,
        ge=1,
        le=MAX_QUEUE_SECONDS,
        description="Seconds the job may wait to start before it ends `expired`. Not with "
        "`start_by`.",
    )


class RetryCreate(QueueOptions):
    """The optional body of a retry: the new job's queue options."""

    priority: int | None = Field(  # type: ignore[assignment]
        default=None,
        ge=-PRIORITY_LIMIT,
        le=PRIORITY_LIMIT,
        description="The new job's priority; the retried job's when omitted.",
    )


class _JobCreate(QueueOptions):
    model: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = Field(
        default=None, description="A catalog model name; the catalog's default when omitted."
    )
    source_prompt: Prompt = ""
    target_prompts: list[NonEmptyPrompt] = Field(min_length=1, max_length=MAX_TARGETS)
    negative_prompt: Prompt = ""
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Random when omitted; always echoed."
    )
    steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    width: int | None = Field(default=None, ge=1, le=16384, description="Default: native size.")
    height: int | None = Field(default=None, ge=1, le=16384, description="Default: native size.")
    control: ControlParams = ControlParams()
    condition: ConditionParams | None = None
    loras: Loras = Field(default_factory=list)
    webhook: WebhookCreate | None = None
    previews: bool = Field(
        default=False,
        description="Publish live previews while the job runs: `preview` events on "
        "`GET /v1/jobs/{id}/events` and the job's `preview`, every few steps.",
    )


class EditParams(_JobCreate):
    """The `params` part of a multipart edit: an edit without `image` (sent as a file part)."""

    anchor_source: bool = Field(
        default=False,
        description="Reset the source latent to the inversion's latent at every step.",
    )


class EditCreate(_JobCreate):
    """A real-image edit: the image is inverted, then regenerated under each target prompt."""

    image: ImageRef
    anchor_source: bool = Field(
        default=False,
        description="Reset the source latent to the inversion's latent at every step.",
    )


class SynthesisCreate(_JobCreate):
    """Consistent synthesis: a source image, and targets that keep its content and layout."""

    source_prompt: NonEmptyPrompt


class SequenceCondition(_Strict):
    """A sequence's layouts: the condition model and its K frames, as images or one video.

    Shaped like :class:`ConditionParams`, with ``frames`` (or ``video``) in place of ``images``.
    """

    model: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="A condition model name the chosen model lists in `GET /v1/models`."
    )
    frames: list[ImageRef] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SEQUENCE_FRAMES,
        description="The condition frames, in order. Give `frames` or `video`, not both.",
    )
    video: ImageRef | None = Field(
        default=None,
        description="A video (MP4, WebM, ...) whose frames are the condition frames; a `data:` "
        "URL or an `s3://` URL in the service's bucket.",
    )
    fps: float | None = Field(
        default=None, gt=0, le=120, description="Video only: frames taken per second of video."
    )
    max_frames: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SEQUENCE_FRAMES,
        description="Video only: at most this many frames, from the start.",
    )
    scale: float = Field(default=1.0, description="Weight of the condition, at least 0.")
    start: float = Field(default=0.0, description="Fraction of the steps where it starts, 0..1.")
    end: float = Field(default=1.0, description="Fraction of the steps where it ends, 0..1.")
    preprocess: Preprocess = Field(
        default="none",
        description="`canny`: the worker turns each frame into an edge map first (ordinary "
        "video); `none`: the frames are maps already.",
    )


class SequenceParams(QueueOptions):
    """The `params` part of a multipart sequence: frames or a video come as file parts."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = Field(
        default=None, description="A catalog model name; the catalog's default when omitted."
    )
    source_prompt: Prompt = ""
    target_prompts: list[NonEmptyPrompt] = Field(
        min_length=1,
        max_length=MAX_SEQUENCE_FRAMES,
        description="One prompt for every frame, or one per frame.",
    )
    negative_prompt: Prompt = ""
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Random when omitted; always echoed."
    )
    steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    width: int | None = Field(default=None, ge=1, le=16384, description="Default: native size.")
    height: int | None = Field(default=None, ge=1, le=16384, description="Default: native size.")
    control: ControlParams = ControlParams()
    condition: SequenceCondition
    anchor_source: bool = Field(
        default=False,
        description="Image source only: reset the source latent to the inversion's at every step.",
    )
    fps: float = Field(default=8.0, gt=0, le=120, description="Frame rate of the animations.")
    loras: Loras = Field(default_factory=list)
    webhook: WebhookCreate | None = None
    previews: bool = Field(
        default=False,
        description="Publish live previews while the job runs: `preview` events on "
        "`GET /v1/jobs/{id}/events` and the job's `preview`, every few steps.",
    )


class SequenceCreate(SequenceParams):
    """Consistent frames from one source (a prompt, or an image that is inverted) and K layouts."""

    image: ImageRef | None = Field(
        default=None, description="A photo as the source (inverted); omit to synthesize one."
    )


# --- the job object -------------------------------------------------------------------------


class ControlInput(BaseModel):
    """The control as it will run: defaults resolved against the model."""

    start_step: int
    start_layer: int
    layers: list[int] | None = None
    steps: list[int] | None = None
    mask: MaskControl = MaskControl()
    defaulted: list[Literal["start_step", "start_layer"]] = Field(
        default_factory=list,
        description="Which start values came from the model's defaults; the worker resolves "
        "them again against the shape it measured from the loaded model.",
    )


class ConditionInput(BaseModel):
    """The condition as it will run: images are storage keys."""

    model: str
    images: list[str]
    source_image: str | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: Preprocess = "none"
    # Sequences whose frames come from a video: its storage key and sampling (``images`` empty).
    video: str | None = None
    fps: float | None = None
    max_frames: int | None = None


class LoraInput(BaseModel):
    """A LoRA adapter as the job runs it: its catalog name and resolved weight."""

    name: str
    weight: float


class JobInput(BaseModel):
    """The validated parameters; images are storage keys (``inputs/<sha256>.<ext>``)."""

    image: str | None = Field(default=None, description="Storage key of the input image (edits).")
    source_prompt: str
    target_prompts: list[str]
    negative_prompt: str = ""
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    control: ControlInput
    condition: ConditionInput | None = None
    anchor_source: bool = False
    loras: list[LoraInput] = Field(default_factory=list)
    animation_fps: float | None = Field(
        default=None, description="Sequences: the frame rate of the MP4 and WebP."
    )
    previews: bool = Field(default=False, description="Whether live previews were asked for.")


class JobProgress(BaseModel):
    phase: ProgressPhase
    step: int
    total: int
    fraction: float = Field(description="Progress of this phase, 0..1.")
    frames_done: int | None = Field(
        default=None, description="Sequences: frames decoded so far (they come at the end)."
    )


class OutputImage(BaseModel):
    role: ImageRole
    prompt: str
    url: str = Field(description="A presigned URL, valid until `output.expires_at`.")
    key: str
    width: int
    height: int


class PreviewImage(BaseModel):
    """One image of a live preview: the run's current guess of a final image, small."""

    role: ImageRole = Field(description="`source`, then `target` (sequences: `frame`).")
    index: int = Field(description="The index of the output image this one previews.")
    url: str = Field(description="A short-lived signed URL (an `<img src>` loads it as it is).")


class JobPreview(BaseModel):
    """The latest live preview of a running job that asked for `previews`."""

    step: int = Field(description="The denoising step the preview shows.")
    steps: int = Field(description="The job's denoising steps.")
    images: list[PreviewImage]


class JobOutput(BaseModel):
    images: list[OutputImage]
    expires_at: datetime | None = Field(
        default=None, description="When the presigned URLs in this response stop working."
    )


def _known_error_code(code: str) -> str:
    return ErrorCode(code).value  # a ValueError names a code no worker sets


class JobError(BaseModel):
    # A string checked against ErrorCode rather than the enum type: the published schema stays a
    # plain string (FastAPI would add every enum it meets as a component), and clients must
    # tolerate new codes anyway.
    code: Annotated[str, AfterValidator(_known_error_code)]
    message: str


class JobMetrics(BaseModel):
    queue_seconds: float | None = None
    inversion_seconds: float | None = None
    denoise_seconds: float | None = None
    total_seconds: float | None = None
    unet_image_evals: int | None = None
    condition_evals: int | None = Field(
        default=None, description="Condition model (ControlNet) image evaluations."
    )


class WebhookDelivery(BaseModel):
    """One delivery attempt of one event."""

    model_config = ConfigDict(extra="allow")

    event: str
    attempt: int = 1
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


class JobWebhook(BaseModel):
    url: str
    events: list[WebhookEvent]
    deliveries: list[WebhookDelivery] = Field(default_factory=list)


class JobUrls(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    self_: str = Field(alias="self")
    cancel: str
    events: str
    retry: str


class JobPublic(BaseModel):
    """A job as clients see it."""

    model_config = ConfigDict(serialize_by_alias=True)

    id: str
    kind: JobKind
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    model: str
    input: JobInput
    queue_position: int | None = Field(
        default=None,
        description="1 for the next job to start; only while queued. Counts the jobs of every "
        "tenant that the queue policy (fair share, then priority) starts before this one.",
    )
    priority: int = 0
    start_by: datetime | None = Field(
        default=None, description="The job's deadline to start; past it, it ends `expired`."
    )
    retry_of: str | None = Field(default=None, description="The job this one retries.")
    retried_by: str | None = Field(default=None, description="The job that retries this one.")
    progress: JobProgress | None = None
    preview: JobPreview | None = Field(
        default=None, description="The latest live preview, while a job with `previews` runs."
    )
    output: JobOutput | None = None
    error: JobError | None = None
    metrics: JobMetrics | None = None
    attempts: int = 0
    webhook: JobWebhook | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="Sentences about the input that did not stop the job, written by the worker "
        "that ran it: e.g. prompt words outside the vocabulary the model declares it was trained "
        "on (the picture may not show them). Each names the field it is about.",
    )
    urls: JobUrls


class JobList(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next (older) page; null at the end."
    )


# --- errors -----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "steps"].')
    message: str
    type: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_request`.")
    message: str = Field(description="One human sentence.")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every non-2xx answer has this body."""

    error: ErrorInfo


# --- models -----------------------------------------------------------------------------------


class DefaultControl(BaseModel):
    start_step: int
    start_layer: int


class ConditionPublic(BaseModel):
    name: str
    kind: str = Field(description="`controlnet` or `t2i_adapter`.")
    family: str


class LoraPublic(BaseModel):
    name: str
    weight: float = Field(description="The weight a request gets when it names none.")


class ModelPublic(BaseModel):
    name: str
    family: str
    native_width: int
    native_height: int
    block_count: int = Field(description="Transformer blocks with self-attention, in run order.")
    size_multiple: int
    max_pixels: int
    default_control: DefaultControl
    shape_source: Literal["measured", "catalog"] = Field(
        description="`measured`: the sizes, block count and default start layer are what a live "
        "worker measured from the loaded checkpoint; `catalog`: no worker has reported yet, so "
        "they are the catalog's declared values, else the family's reference checkpoint's."
    )
    prediction_type: str | None = Field(
        default=None,
        description="What the model predicts (`epsilon`, `v_prediction`, `flow`), measured.",
    )
    live: bool = Field(description="Whether a live worker currently serves this model.")
    preview_decoder: Literal["tiny_autoencoder", "vae"] = Field(
        description="What decodes live previews: a tiny autoencoder (fast, every few steps) or "
        "the model's own VAE (slower, so less often)."
    )
    conditions: list[ConditionPublic] = Field(
        default_factory=list, description="Condition models a request may name."
    )
    loras: list[LoraPublic] = Field(
        default_factory=list, description="LoRA adapters a request may activate."
    )
    features: FamilyFeatures = Field(
        description="What the service offers on this model's family: a request for a feature "
        "marked false is answered 422 naming the field."
    )


class ModelList(BaseModel):
    default: str
    data: list[ModelPublic]
