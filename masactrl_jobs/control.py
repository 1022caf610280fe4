"""What a model can run: a job's control and image size, resolved against its catalog entry.

One home for these rules, used by the gateway (to answer 422 before queueing), the GPU worker
(before handing the job to the engine) and ``masactrl synthesize``/``edit``:

- **Control.** Omitted values take the model's defaults (the catalog entry's
  ``default_start_step`` / ``default_start_layer``: declared, else the rules of
  ``masactrl_jobs.shape`` over the model's block count). A ``start_step`` may be at most
  ``steps``: ``start_step == steps`` (or ``steps: []``) runs without the control, the one way to
  do so everywhere. A default start step is clipped to ``steps``. Layers must be below the
  model's ``block_count``; explicit ``layers`` / ``steps`` lists override the start values.
- **Size.** Width and height default to the native size, must be multiples of the model's
  ``size_multiple`` (the VAE factor times the UNet's downsampling) and stay within ``max_pixels``.
- **LoRA adapters.** Each named adapter must be one of the model's catalog adapters; an omitted
  weight is the catalog's weight for it.
- **Condition.** A layout condition (ControlNet or T2I-Adapter) has one image per target or one
  shared by all, a source image only in a synthesis (an edit's source is the inverted photo), a
  window ``0 <= start < end <= 1``, a non-negative scale and a preprocessing in
  :data:`PREPROCESSINGS`.

Problems are collected, not raised one at a time, so a client sees every mistake in one answer;
each names the request field (``("control", "start_layer")``) and says what is wrong in a sentence.

**The contract in words.** Each check declares, beside it, the :class:`Rule` it enforces: the
request fields it refuses and one line that states it. The job kinds list the rules they apply
(``Kind.rules``), and the gateway renders them into its OpenAPI text once at start-up, with the
model values from its catalog (``service.api.contract``), so the published contract is generated
from the checks rather than written beside them (tests/service/test_contract.py breaks each rule
through the gateway and expects the field it names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, get_args

from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.schema import ControlInput, LoraInput, MaskControl, Preprocess
from masactrl_jobs.shape import DEFAULT_START_STEP, PAPER_BLOCK_COUNT, PAPER_START_LAYER

__all__ = [
    "CONDITION_IMAGES_RULE",
    "CONDITION_SCALE_RULE",
    "CONDITION_SOURCE_IMAGE_RULE",
    "CONDITION_WINDOW_RULE",
    "CONTROL_DEFAULTS",
    "CONTROL_LAYERS_RULE",
    "CONTROL_STEPS_RULE",
    "InvalidParameters",
    "LORA_NAME_RULE",
    "MAX_PIXELS_RULE",
    "Problem",
    "RequestedControl",
    "PREPROCESSINGS",
    "Rule",
    "SEQUENCE_FRAME_COUNT_RULE",
    "SEQUENCE_MAX_FRAMES_RULE",
    "SEQUENCE_FRAMES_RULE",
    "SEQUENCE_PROMPTS_RULE",
    "SEQUENCE_SAMPLING_RULE",
    "SIZE_DEFAULTS",
    "SIZE_MULTIPLE_RULE",
    "START_STEP_RULE",
    "check_control",
    "condition_problems",
    "control_problems",
    "lora_problems",
    "resolve_loras",
    "resolve_control",
    "resolve_size",
    "sequence_problems",
    "size_problems",
]

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing the model cannot run: the request field at fault and a sentence."""

    field: FieldPath
    message: str


@dataclass(frozen=True)
class Rule:
    """One rule of the API's contract, declared beside the check that enforces it.

    ``fields`` are the request fields a request that breaks it is refused on, dotted
    (``control.start_step``; ``loras[].name`` for any index): the ``loc`` of its 422 (413 where
    the text says so). ``text`` states the rule in one line of Markdown. Values that depend on
    the model (size multiple, block count, max pixels, default control) are named, not written:
    the gateway prints them per model in a table from its catalog. ``{name}`` placeholders are
    the deployment's limits (``masactrl_jobs.kinds.base.Limits``), filled in at start-up.
    """

    fields: tuple[str, ...]
    text: str


class InvalidParameters(ValueError):
    """Parameters the model cannot run; ``problems`` lists each one with its field."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(problem.message for problem in problems))
        self.problems = list(problems)


class RequestedControl(Protocol):
    """The control a caller asks for (``schema.ControlParams``); None means the model's default."""

    @property
    def start_step(self) -> int | None: ...

    @property
    def start_layer(self) -> int | None: ...

    @property
    def layers(self) -> Sequence[int] | None: ...

    @property
    def steps(self) -> Sequence[int] | None: ...


_CONTROL = "control"

START_STEP_RULE = Rule(
    ("control.start_step",), "from 0 to `steps`; equal to `steps` runs without the control."
)
CONTROL_STEPS_RULE = Rule(
    ("control.steps",),
    "every index below `steps`; it overrides `start_step`, and `[]` runs without the control.",
)
CONTROL_LAYERS_RULE = Rule(
    ("control.start_layer", "control.layers"),
    "below the model's block count (every index of `layers`, which overrides `start_layer`).",
)
# What an omitted control becomes (resolve_control), from the rules of masactrl_jobs.shape.
CONTROL_DEFAULTS = (
    Rule(
        ("control.start_step",),
        f"the model's default start step: {DEFAULT_START_STEP}, the paper's, unless the catalog "
        "declares another; at most `steps`.",
    ),
    Rule(
        ("control.start_layer",),
        "the model's default start layer: the paper's depth, `round(block count × "
        f"{PAPER_START_LAYER} / {PAPER_BLOCK_COUNT})` ({PAPER_START_LAYER} of SD 1.5's "
        f"{PAPER_BLOCK_COUNT} blocks), unless the catalog or the checkpoint's `masactrl.json` "
        "declares another.",
    ),
)


def _step_problems(control: RequestedControl, steps: int) -> list[Problem]:
    problems = []
    # start_step == steps is allowed: it is how a run goes without the control.
    if control.start_step is not None and not 0 <= control.start_step <= steps:
        problems.append(
            Problem(
                (_CONTROL, "start_step"),
                f"start_step must be between 0 and steps ({steps}; equal to steps runs without "
                f"the control), got {control.start_step}",
            )
        )
    bad_steps = [s for s in control.steps or [] if not 0 <= s < steps]
    if bad_steps:
        problems.append(
            Problem(
                (_CONTROL, "steps"), f"control steps must be below steps ({steps}), got {bad_steps}"
            )
        )
    return problems


def _layer_problems(control: RequestedControl, entry: ModelEntry) -> list[Problem]:
    problems = []
    blocks = entry.block_count
    if control.start_layer is not None and not 0 <= control.start_layer < blocks:
        problems.append(
            Problem(
                (_CONTROL, "start_layer"),
                f"start_layer must be less than {blocks} ({entry.name} has {blocks} transformer "
                f"blocks), got {control.start_layer}",
            )
        )
    bad_layers = [layer for layer in control.layers or [] if not 0 <= layer < blocks]
    if bad_layers:
        problems.append(
            Problem(
                (_CONTROL, "layers"),
                f"layers must be below {blocks} ({entry.name} has {blocks} transformer blocks), "
                f"got {bad_layers}",
            )
        )
    return problems


def control_problems(entry: ModelEntry, requested: RequestedControl, steps: int) -> list[Problem]:
    """Every problem of a requested control for ``entry`` and a run of ``steps`` (empty if none)."""
    return _step_problems(requested, steps) + _layer_problems(requested, entry)


def resolve_control(
    entry: ModelEntry,
    requested: RequestedControl,
    steps: int,
    mask: MaskControl | None = None,
    *,
    checked: bool = False,
) -> ControlInput:
    """The control as it will run on ``entry``; :class:`InvalidParameters` when it cannot.

    Omitted start values take the entry's defaults and are listed in ``defaulted``, so a worker
    that measures another shape than the one the gateway knew resolves them again
    (:func:`rebase_control`). ``checked``: the caller has already reported
    :func:`control_problems` (the gateway collects every problem of a request first).
    """
    if not checked and (problems := control_problems(entry, requested, steps)):
        raise InvalidParameters(problems)
    defaulted = [name for name in ("start_step", "start_layer") if getattr(requested, name) is None]
    return ControlInput(
        # A default start step past a short run means no controlled step, which is allowed.
        start_step=(
            requested.start_step
            if requested.start_step is not None
            else min(entry.default_start_step, steps)
        ),
        start_layer=(
            requested.start_layer
            if requested.start_layer is not None
            else entry.default_start_layer
        ),
        layers=list(requested.layers) if requested.layers is not None else None,
        steps=list(requested.steps) if requested.steps is not None else None,
        mask=mask if mask is not None else MaskControl(),
        defaulted=defaulted,
    )


def check_control(entry: ModelEntry, control: ControlInput, steps: int) -> ControlInput:
    """The control a worker runs: its defaulted values resolved again against ``entry`` (the
    shape the worker measured; the gateway may have known only the catalog's), then checked.

    The gateway resolved the rest against its own copy of the catalog; the worker's entry is the
    one that matters, so :class:`InvalidParameters` when it cannot run them.
    """
    if control.defaulted:
        rebased = {
            "start_step": min(entry.default_start_step, steps),
            "start_layer": entry.default_start_layer,
        }
        control = control.model_copy(
            update={name: rebased[name] for name in control.defaulted if name in rebased}
        )
    if problems := control_problems(entry, control, steps):
        raise InvalidParameters(problems)
    return control


class RequestedLora(Protocol):
    """A LoRA adapter a caller asks for (``schema.LoraParams``); weight None is the catalog's."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float | None: ...


LORA_NAME_RULE = Rule(
    ("loras[].name",), "one of the model's LoRA adapters (`GET /v1/models`: `loras[].name`)."
)


def lora_problems(entry: ModelEntry, loras: Sequence[RequestedLora]) -> list[Problem]:
    """One problem per adapter name that ``entry`` does not list."""
    available = ", ".join(sorted(entry.loras)) or "none"
    return [
        Problem(
            ("loras", index, "name"),
            f"{entry.name} has no LoRA adapter {lora.name!r}; available: {available}",
        )
        for index, lora in enumerate(loras)
        if lora.name not in entry.loras
    ]


def resolve_loras(entry: ModelEntry, loras: Sequence[RequestedLora]) -> list[LoraInput]:
    """The adapters as the job runs them, omitted weights filled in from the catalog."""
    problems = lora_problems(entry, loras)
    if problems:
        raise InvalidParameters(problems)
    return [
        LoraInput(
            name=lora.name,
            weight=entry.loras[lora.name].weight if lora.weight is None else lora.weight,
        )
        for lora in loras
    ]


SIZE_MULTIPLE_RULE = Rule(("width", "height"), "multiples of the model's size multiple.")
MAX_PIXELS_RULE = Rule(
    ("width", "height"),
    "`width × height` at most the model's max pixels (an omitted side counts as the native one; "
    "the refusal names `width` when it was given).",
)
# What an omitted size becomes (resolve_size).
SIZE_DEFAULTS = (Rule(("width", "height"), "the model's native size."),)


def size_problems(entry: ModelEntry, width: int | None, height: int | None) -> list[Problem]:
    """Every problem of a requested size for ``entry`` (None takes the native side)."""
    problems = []
    multiple = entry.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value <= 0:
            problems.append(Problem((name,), f"{name} must be positive, got {value}"))
        elif value % multiple:
            problems.append(
                Problem(
                    (name,),
                    f"{name} must be a multiple of {multiple} for {entry.name}, got {value}",
                )
            )
    if any(value is not None and value <= 0 for value in (width, height)):
        return problems
    final_width = width or entry.native_width
    final_height = height or entry.native_height
    pixels = final_width * final_height
    if pixels > entry.max_pixels:
        problems.append(
            Problem(
                ("width" if width is not None else "height",),
                f"{final_width}×{final_height} is {pixels} pixels; {entry.name} allows at most "
                f"{entry.max_pixels}",
            )
        )
    return problems


def resolve_size(
    entry: ModelEntry, width: int | None, height: int | None, *, checked: bool = False
) -> tuple[int, int]:
    """``(width, height)`` as the job will run; :class:`InvalidParameters` when ``entry`` can't.

    ``checked``: the caller has already reported :func:`size_problems`.
    """
    if not checked and (problems := size_problems(entry, width, height)):
        raise InvalidParameters(problems)
    return width or entry.native_width, height or entry.native_height


# What the worker can make of a condition image before the model sees it: nothing, or an edge map.
PREPROCESSINGS: tuple[str, ...] = get_args(Preprocess)

_CONDITION = "condition"

CONDITION_IMAGES_RULE = Rule(("condition.images",), "one image per target prompt, or one for all.")
CONDITION_SOURCE_IMAGE_RULE = Rule(
    ("condition.source_image",), "only in a synthesis: an edit's source is the inverted photo."
)
CONDITION_WINDOW_RULE = Rule(
    ("condition.start", "condition.end"),
    "`0 ≤ start < end ≤ 1`, the fractions of the steps that run with the condition.",
)
CONDITION_SCALE_RULE = Rule(("condition.scale",), "at least 0.")


def condition_problems(
    *,
    targets: int,
    images: int,
    has_source_image: bool,
    editing: bool,
    scale: float,
    start: float,
    end: float,
    preprocess: str = "none",
) -> list[Problem]:
    """Every problem of a condition's shape and window for a run with ``targets`` target prompts.

    Field paths are relative to the request (``("condition", "images")``); the CLI turns the
    messages into usage errors, the gateway into a 422.
    """
    problems = []
    if images not in (1, targets):
        problems.append(
            Problem(
                (_CONDITION, "images"),
                f"give one condition image per target prompt ({targets}) or one for all, "
                f"got {images}",
            )
        )
    if has_source_image and editing:
        problems.append(
            Problem(
                (_CONDITION, "source_image"),
                "an edit takes no source condition image: its source is the inverted photo",
            )
        )
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            problems.append(
                Problem((_CONDITION, name), f"condition {name} must be within [0, 1], got {value}")
            )
    if 0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and start >= end:
        problems.append(
            Problem(
                (_CONDITION, "end"),
                f"condition start must be less than end, got start {start} and end {end}",
            )
        )
    if scale < 0:
        problems.append(
            Problem((_CONDITION, "scale"), f"condition scale must not be negative, got {scale}")
        )
    if preprocess not in PREPROCESSINGS:
        problems.append(
            Problem(
                (_CONDITION, "preprocess"),
                f"condition preprocess must be one of {', '.join(PREPROCESSINGS)}, "
                f"got {preprocess!r}",
            )
        )
    return problems


SEQUENCE_FRAMES_RULE = Rule(
    ("condition.frames", "condition.video"), "a sequence takes condition frames or one video."
)
SEQUENCE_FRAME_COUNT_RULE = Rule(
    ("condition.frames", "condition.video"),
    "at most {max_sequence_frames} frames (a video: the frames its sampling gives).",
)
SEQUENCE_SAMPLING_RULE = Rule(
    ("condition.fps",), "`fps` and `max_frames` sample a video; frames take neither."
)
SEQUENCE_MAX_FRAMES_RULE = Rule(
    ("condition.max_frames",), "at most {max_sequence_frames}, the frames a sequence takes."
)
SEQUENCE_PROMPTS_RULE = Rule(
    ("target_prompts",), "one prompt for all the frames, or one per frame; a video takes one."
)


def sequence_problems(
    *,
    frames: int | None,
    has_video: bool,
    targets: int,
    max_frames: int,
    sampled: bool = False,
    sample_frames: int | None = None,
) -> list[Problem]:
    """Every problem of a sequence's frames: ``frames`` images or one video, and its prompts.

    ``frames`` is the number of frame images (None when a video gives them; its count is known
    only once it is probed or decoded, and is checked then with ``frames`` set). ``sampled``:
    ``fps`` or ``max_frames`` was given, which only a video can use; ``sample_frames`` is that
    ``max_frames``, which may not ask for more frames than a sequence takes.
    """
    problems = []
    if frames is None and not has_video:
        problems.append(
            Problem((_CONDITION, "frames"), "a sequence needs condition frames or a video")
        )
    if frames is not None and has_video:
        problems.append(
            Problem((_CONDITION, "video"), "give condition frames or a video, not both")
        )
    if has_video and frames is None and targets > 1:
        problems.append(
            Problem(
                ("target_prompts",),
                "a video's frame count is known only once it is decoded: give one target prompt",
            )
        )
    if sampled and not has_video:
        problems.append(
            Problem((_CONDITION, "fps"), "fps and max_frames sample a video; no video was given")
        )
    if sample_frames is not None and sample_frames > max_frames:
        problems.append(
            Problem(
                (_CONDITION, "max_frames"),
                f"max_frames is {sample_frames}; a sequence takes at most {max_frames} frames",
            )
        )
    if frames is not None and frames > max_frames:
        problems.append(
            Problem(
                (_CONDITION, "frames"),
                f"a sequence takes at most {max_frames} condition frames, got {frames}",
            )
        )
    if frames is not None and targets not in (1, frames):
        problems.append(
            Problem(
                ("target_prompts",),
                f"give one target prompt for every frame or one per frame ({frames}), "
                f"got {targets}",
            )
        )
    return problems
