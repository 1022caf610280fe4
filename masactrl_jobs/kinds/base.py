"""What a job kind is, and what the gateway and the worker give it.

A job kind (edit, synthesis, sequence) is everything that differs between the jobs the service
runs. Each kind writes all of it in one module of this package, as a subclass of :class:`Kind`:

- its **parameters**: the request bodies it accepts (``bodies``, the pydantic classes of
  ``masactrl_jobs.schema``) and the file parts of its multipart form (its ``Files`` class);
- its **submission checks**: every problem of a request that needs the catalog or several fields
  (:meth:`Kind.check`), before anything is read or stored, and the rules they enforce in words
  (``rules``: ``masactrl_jobs.control.Rule``, from which the gateway writes its OpenAPI text);
- its **inputs**: whether it has any to take (:meth:`Kind.takes_inputs`), reading and checking
  them (:meth:`Kind.read_inputs`), and the input as it will run (:meth:`Kind.resolve`);
- its **run** on a GPU worker: the inputs it loads (:meth:`Kind.load`), the engine call it makes
  (:meth:`Kind.run`) and the results it writes (:meth:`Kind.outputs`).

``masactrl_jobs.kinds.KINDS`` registers each kind under its ``JobKind``. The gateway's submission
(``service.submission``) and the worker's runner (``worker.runner``) hold no branch on the kind:
they look it up and call these methods, and what comes back is typed (:class:`Issue`, the kind's
inputs, ``JobInput``, :class:`Source`, :class:`Ran`, :class:`ImageOutput` and
:class:`AnimationOutput`).

**Why one module here, rather than a gateway half in ``service`` and a worker half in
``worker``.** The two halves of a kind change together: a new input is checked at submission,
stored, resolved into the job's input and loaded by the worker; a new engine option is a new
parameter, a new check, a new resolved field and a new argument. Two halves registered under the
same ``JobKind`` in two packages would drift apart the way the ``if`` chains did. The price is
that a kind may import neither the gateway nor the worker (``masactrl_jobs`` is torch-free and
sits below both), so each half is written against a small protocol that its caller provides:

- the gateway gives :class:`Intake`, one per request (read a reference or check an upload,
  blaming a field path, against the request's byte budget; read and probe a video) and
  :class:`Limits` (its settings). A kind reports problems as :class:`Issue` (a 422 naming the
  field) and raises :class:`Refused` (422 or 413) for what it finds while reading; the gateway
  turns both into its error envelope;
- the worker gives :class:`RunContext`: the engine (:class:`Engine`), the job's stored inputs,
  the options every engine call shares (seed, size, control, progress, cancel, previews), masks,
  layout conditions, the inversion cache and frame progress. A kind raises
  :class:`JobInputError` for an input only the worker can find broken; the job fails with
  ``invalid_input``.

Everything around a kind stays in one place for all of them: limits, idempotency, the rate and
queue checks and the one-script enqueue in ``service.submission``; leases, fencing, LoRA
activation, the previews' lifetime, metrics and the job's end in ``worker.runner``.
"""

from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel

from masactrl_jobs.catalog import ModelEntry, UnknownCondition
from masactrl_jobs.control import (
    CONTROL_LAYERS_RULE,
    CONTROL_STEPS_RULE,
    LORA_NAME_RULE,
    MAX_PIXELS_RULE,
    SIZE_MULTIPLE_RULE,
    START_STEP_RULE,
    Problem,
    Rule,
    control_problems,
    lora_problems,
    size_problems,
)
from masactrl_jobs.images import Payload, StoredInput, ValidatedImage
from masactrl_jobs.schema import (
    MAX_SEED,
    ConditionInput,
    ImageRole,
    JobInput,
    JobKind,
    Preprocess,
    WebhookCreate,
)

if TYPE_CHECKING:
    from PIL import Image

    from masactrl_jobs.control import RequestedControl, RequestedLora
    from masactrl_jobs.media import VideoBudget, VideoInfo

__all__ = [
    "AnimationOutput",
    "Engine",
    "ImageOutput",
    "Inputs",
    "Intake",
    "Inversion",
    "Issue",
    "JobBody",
    "JobInputError",
    "Kind",
    "Limits",
    "AUTOMATIC_MASK_RULE",
    "CONDITION_FAMILY_RULE",
    "CONDITION_MODEL_RULE",
    "NEGATIVE_PROMPT_RULE",
    "Output",
    "PARAMETER_RULES",
    "Ran",
    "Refused",
    "RunContext",
    "Source",
    "automatic_mask_issues",
    "condition_family_issues",
    "condition_model_issues",
    "negative_prompt_issues",
    "parameter_issues",
    "random_seed",
    "read_source",
]

Loc = Sequence[str | int]
BODY = "body"


# -- what a kind reports --------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One problem of a request, found before anything is stored: a 422 naming ``loc``."""

    loc: tuple[str | int, ...]
    message: str
    type: str = "value_error"


class Refused(Exception):
    """A request refused while its inputs are read: a 422, or a 413 when ``too_large``."""

    def __init__(self, issue: Issue, *, too_large: bool = False) -> None:
        super().__init__(issue.message)
        self.issue = issue
        self.too_large = too_large


class JobInputError(ValueError):
    """An input only the worker can find broken (gone from storage, undecodable, refused by this
    worker's catalog): the job fails with ``invalid_input`` and this sentence."""


# -- what the gateway gives a kind ----------------------------------------------------------------


class JobBody(Protocol):
    """What every kind's request body has: the submission reads these, the kind the rest."""

    @property
    def model(self) -> str | None: ...

    @property
    def webhook(self) -> WebhookCreate | None: ...


class Limits(Protocol):
    """The gateway's limits a kind checks its inputs against (``GatewaySettings`` has them)."""

    @property
    def max_sequence_frames(self) -> int: ...

    @property
    def max_sequence_bytes(self) -> int: ...

    @property
    def max_video_bytes(self) -> int: ...

    @property
    def max_video_seconds(self) -> float: ...

    @property
    def max_image_side(self) -> int: ...

    @property
    def max_video_pixels(self) -> int: ...


class Intake(Protocol):
    """How a kind reads its inputs at the gateway (``service.intake.RequestIntake``): one per
    request.

    Nothing is stored while reading: the gateway stores what :meth:`Inputs.to_store` lists once
    every input has been read and checked. Every input's bytes count against the request's byte
    budget (and the gateway's), a reference named twice is read once, and large inputs stay in
    temporary files rather than in memory. A bad input raises the gateway's own field error,
    which passes through the kind untouched.
    """

    async def read(self, ref: str, loc: Loc, what: str = "image") -> ValidatedImage:
        """The image ``ref`` names (data:, https:, s3:), fetched and validated."""
        ...

    async def check(self, data: Payload, loc: Loc, what: str = "image") -> ValidatedImage:
        """Uploaded image bytes (or the file they were spooled to), validated."""
        ...

    async def read_video(self, ref: str, loc: Loc, max_bytes: int) -> StoredInput:
        """The video ``ref`` names, at most ``max_bytes``, in a temporary file (not probed)."""
        ...

    async def check_video(self, data: Payload, loc: Loc, max_bytes: int) -> StoredInput:
        """An uploaded video, at most ``max_bytes``, in a temporary file (not probed)."""
        ...

    async def probe_video(self, video: StoredInput, count_up_to: int) -> VideoInfo:
        """A video's size and duration, its frames counted up to ``count_up_to + 1``
        (``masactrl_jobs.media.probe_video``; ``MediaError`` when unreadable)."""
        ...


class Inputs(Protocol):
    """A kind's inputs, read and checked, not yet stored."""

    def to_store(self) -> list[ValidatedImage | StoredInput]:
        """Everything to put under ``inputs/`` once every check has passed."""
        ...


# -- what the worker gives a kind -----------------------------------------------------------------


class Engine(Protocol):
    """The engine calls a kind makes (``masactrl_core.MasaCtrlEngine``; docs/engine.md)."""

    def synthesize(self, *args: Any, **kwargs: Any) -> Any: ...

    def edit(self, *args: Any, **kwargs: Any) -> Any: ...

    def sequence(self, *args: Any, **kwargs: Any) -> Any: ...


class Inversion(Protocol):
    """The inversion cache's slot for one photo at this job's settings."""

    @property
    def inverted(self) -> Any:
        """The cached ``InvertedImage``, or None: the engine inverts the photo again."""
        ...

    def keep(self, fresh: Any) -> None:
        """Save the run's fresh inversion (nothing when the cached one served)."""
        ...


class RunContext(Protocol):
    """What a kind's run gets on a GPU worker (``worker.context.JobContext``).

    Every method fails the job with a code and a sentence on its own (a missing input is
    ``invalid_input``, a condition model that cannot load ``internal_error``).
    """

    @property
    def input(self) -> JobInput:
        """The job's input as the gateway resolved it."""
        ...

    @property
    def engine(self) -> Engine: ...

    @property
    def max_sequence_frames(self) -> int:
        """The engine's limit of frames per sequence."""
        ...

    @property
    def video_budget(self) -> VideoBudget:
        """What decoding a condition video may cost on this worker (its settings, the engine's
        frame limit)."""
        ...

    def read(self, key: str, what: str) -> bytes:
        """A stored input's bytes."""
        ...

    def decode(self, data: bytes, what: str, mode: str = "RGB") -> Image.Image:
        """Stored image bytes, decoded fully."""
        ...

    def preprocess(self, image: Image.Image, preprocess: Preprocess) -> Image.Image:
        """A layout condition image as its condition model takes it (canny edges, or as is)."""
        ...

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments every engine call shares: seed, steps, guidance, negative
        prompt, size, the checked control, progress, cancel polling and live previews."""
        ...

    def masks(self) -> Any:
        """The job's ``MaskConfig`` (its region images read), or None."""
        ...

    def condition_model(self, name: str) -> Any:
        """A loaded layout condition model of this worker's catalog."""
        ...

    def condition(
        self,
        model: Any,
        images: Sequence[Image.Image],
        requested: ConditionInput,
        source_image: Image.Image | None = None,
    ) -> Any:
        """The engine's ``Condition``: ``images`` under ``model`` with the requested scale and
        window."""
        ...

    def inversion(self, image_sha256: str) -> Inversion:
        """The inversion cache's slot for the photo with this digest."""
        ...

    def frames_done(self, count: int) -> None:
        """Report a sequence's frames done so far with the progress."""
        ...


# -- what a kind's run gives back -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The photo a job starts from and its digest (the inversion cache's key); both None when
    the source is synthesized."""

    image: Image.Image | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Ran:
    """One engine run: its result, how long the engine took, and the condition images as the
    engine received them, each with the prompt it lays out (published with the results)."""

    result: Any
    engine_seconds: float
    conditions: Sequence[tuple[str, Image.Image]] = ()

    @property
    def stats(self) -> Any:
        """The engine's ``RunStats``."""
        return self.result.stats


@dataclass(frozen=True)
class ImageOutput:
    """A result image, stored as ``results/<job_id>/<role>_<index>.png``."""

    role: ImageRole
    index: int
    prompt: str
    image: Image.Image


@dataclass(frozen=True)
class AnimationOutput:
    """An encoded animation, stored as ``results/<job_id>/sequence.<extension>``."""

    extension: str
    prompt: str
    data: bytes
    size: tuple[int, int]


Output = ImageOutput | AnimationOutput


# -- the interface --------------------------------------------------------------------------------

BodyT = TypeVar("BodyT", bound=BaseModel)
FilesT = TypeVar("FilesT")
InputsT = TypeVar("InputsT", bound=Inputs)


class Kind(ABC, Generic[BodyT, FilesT, InputsT]):
    """One job kind: its parameters, submission checks, inputs and run (see the module text).

    ``BodyT`` is its request body, ``FilesT`` the file parts of its multipart form (``None`` for
    a kind with JSON bodies only), ``InputsT`` its inputs as read at the gateway.
    """

    kind: ClassVar[JobKind]
    # The request bodies the kind accepts (JSON, and the params part of its multipart form).
    bodies: ClassVar[tuple[type[BaseModel], ...]]
    # The role of the images after the source in live previews.
    preview_role: ClassVar[ImageRole] = ImageRole.target
    # The rules check() enforces, in words: the gateway's OpenAPI text for the kind's route.
    rules: ClassVar[tuple[Rule, ...]]

    # -- at the gateway

    def files_digest(self, files: FilesT) -> str | None:
        """One digest of the file parts, for the idempotency hash (None without files)."""
        return None

    @abstractmethod
    def check(
        self, body: BodyT, entry: ModelEntry, limits: Limits, files: FilesT | None
    ) -> list[Issue]:
        """Every problem of ``body`` (and its file parts) that needs no input read."""

    @abstractmethod
    def takes_inputs(self, body: BodyT, files: FilesT | None) -> bool:
        """Whether the request has inputs to read and store (they cost bandwidth and storage,
        so the gateway spends the rate token and checks the queue before reading them)."""

    @abstractmethod
    async def read_inputs(
        self, intake: Intake, limits: Limits, body: BodyT, files: FilesT | None
    ) -> InputsT:
        """Every input, read and checked; nothing stored. ``body`` has passed :meth:`check`."""

    @abstractmethod
    def resolve(self, body: BodyT, entry: ModelEntry, inputs: InputsT | None) -> JobInput:
        """The job as it will run: defaults from the model, inputs as storage keys (``inputs``
        is None when :meth:`takes_inputs` said there were none)."""

    # -- on a GPU worker

    @abstractmethod
    def load(self, ctx: RunContext) -> Source:
        """The photo the job starts from, read and decoded (an empty ``Source`` without one)."""

    @abstractmethod
    def run(self, ctx: RunContext, source: Source) -> Ran:
        """The engine call, with whatever else it needs read from storage."""

    @abstractmethod
    def outputs(self, job: JobInput, ran: Ran) -> list[Output]:
        """The results to store, in the order the job lists them."""


# -- helpers the kinds share ----------------------------------------------------------------------


class _Parameters(Protocol):
    """The parameters every kind has, checked against the model alike."""

    @property
    def steps(self) -> int: ...

    @property
    def width(self) -> int | None: ...

    @property
    def height(self) -> int | None: ...

    @property
    def control(self) -> RequestedControl: ...

    @property
    def loras(self) -> Sequence[RequestedLora]: ...


def issues(problems: Sequence[Problem]) -> list[Issue]:
    """The resolver's problems as issues of the request body."""
    return [Issue((BODY, *problem.field), problem.message) for problem in problems]


# What parameter_issues checks, for every kind.
PARAMETER_RULES = (
    SIZE_MULTIPLE_RULE,
    MAX_PIXELS_RULE,
    START_STEP_RULE,
    CONTROL_STEPS_RULE,
    CONTROL_LAYERS_RULE,
    LORA_NAME_RULE,
)


def parameter_issues(entry: ModelEntry, body: _Parameters) -> list[Issue]:
    """The control, size and LoRA problems of ``body`` on ``entry`` (``masactrl_jobs.control``)."""
    problems = control_problems(entry, body.control, body.steps)
    problems += size_problems(entry, body.width, body.height)
    problems += lora_problems(entry, body.loras)
    return issues(problems)


CONDITION_MODEL_RULE = Rule(
    ("condition.model",),
    "one of the model's condition models (`GET /v1/models`: `conditions[].name`).",
)


def condition_model_issues(entry: ModelEntry, name: str) -> list[Issue]:
    """An ``unknown_condition`` issue when ``entry`` lists no condition model ``name``."""
    try:
        entry.condition(name)
    except UnknownCondition as exc:
        return [Issue((BODY, "condition", "model"), str(exc), "unknown_condition")]
    return []


CONDITION_FAMILY_RULE = Rule(
    ("condition",),
    "only on a model whose family takes layout conditions (`GET /v1/models`: "
    "`features.layout_conditions`; not SD3 or FLUX.1).",
)
AUTOMATIC_MASK_RULE = Rule(
    ("control.mask.mode",),
    "not `auto` on a model whose family has no automatic masks (`GET /v1/models`: "
    "`features.automatic_masks`; not SD3 or FLUX.1).",
)
NEGATIVE_PROMPT_RULE = Rule(
    ("negative_prompt",),
    "empty on a guidance-distilled model (`GET /v1/models`: `features.negative_prompt` false: "
    "FLUX.1), where it would have no effect.",
)


def condition_family_issues(entry: ModelEntry, loc: Loc = (BODY, "condition")) -> list[Issue]:
    """An ``unsupported_feature`` issue at ``loc`` when ``entry``'s family takes no layout
    conditions (``masactrl_jobs.shape.FAMILY_FEATURES``)."""
    features = entry.features
    if features.layout_conditions:
        return []
    message = f"{entry.name} is a {entry.family} model, and {features.unavailable}"
    return [Issue(tuple(loc), message, "unsupported_feature")]


def automatic_mask_issues(entry: ModelEntry, mode: str) -> list[Issue]:
    """An ``unsupported_feature`` issue when automatic masks are asked of a family without."""
    if mode != "auto" or entry.features.automatic_masks:
        return []
    message = (
        f"{entry.name} is a {entry.family} model, which has no cross-attention to read a word's "
        "map from: automatic masks are not available on it yet; draw the regions (mode "
        "'manual')"
    )
    return [Issue((BODY, "control", "mask", "mode"), message, "unsupported_feature")]


def negative_prompt_issues(entry: ModelEntry, negative_prompt: str) -> list[Issue]:
    """An ``unsupported_feature`` issue when a negative prompt is given to a model on which it
    has no effect (a guidance-distilled FLUX.1)."""
    if entry.features.negative_prompt or not negative_prompt.strip():
        return []
    message = (
        f"{entry.name} is a guidance-distilled {entry.family} model: guidance_scale is an input "
        "of the model and there are no unconditional rows, so a negative prompt has no effect; "
        "leave it empty"
    )
    return [Issue((BODY, "negative_prompt"), message, "unsupported_feature")]


_SEED_BITS = MAX_SEED.bit_length()


def random_seed() -> int:
    """A uniform seed in [0, MAX_SEED]: random bits, as many as MAX_SEED has."""
    # MAX_SEED is 2**32 - 1, so 32 bits always fit; randbelow(2**32) would draw 33 bits and
    # retry half the time. The fallback keeps the draw uniform should MAX_SEED ever change.
    seed = secrets.randbits(_SEED_BITS)
    return seed if seed <= MAX_SEED else secrets.randbelow(MAX_SEED + 1)


def read_source(ctx: RunContext, key: str) -> Source:
    """The stored photo ``key``, decoded, with its digest (the inversion cache's key)."""
    data = ctx.read(key, "input image")
    return Source(ctx.decode(data, "input image"), hashlib.sha256(data).hexdigest())
