"""The job kinds' registry, and each kind's two halves against fakes of what its callers give.

The gateway and the worker dispatch through ``KINDS`` (tests/service/test_submit_kinds.py and
tests/worker/test_runner_kinds.py check that each reaches the registered kind); here each kind's
handlers are called directly: checks and the resolved input at the gateway, and on the worker
the engine call it makes and the results it lists. No torch: a fake engine answers.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from pydantic import BaseModel

from masactrl_jobs.catalog import Catalog, ModelEntry
from masactrl_jobs.images import Payload, StoredInput, ValidatedImage, validate_image
from masactrl_jobs.kinds import KINDS, Kind, kind_of
from masactrl_jobs.kinds.base import (
    AnimationOutput,
    ImageOutput,
    Issue,
    JobInputError,
    Refused,
    Source,
)
from masactrl_jobs.media import VideoBudget, VideoInfo
from masactrl_jobs.schema import (
    ConditionInput,
    ControlInput,
    EditCreate,
    ImageRole,
    JobInput,
    JobKind,
    Preprocess,
    SequenceCreate,
    SynthesisCreate,
)

ENTRY: ModelEntry = Catalog.model_validate(
    {
        "default": "sd15",
        "models": {
            "sd15": {
                "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "family": "sd",
                "conditions": {
                    "canny": {"source": "lllyasviel/sd-controlnet-canny", "kind": "controlnet"}
                },
            }
        },
    }
).get("sd15")


def _png(color: tuple[int, int, int] = (200, 40, 40), size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


PNG_URL = "data:image/png;base64,iVBORw0KGgo="  # never fetched: the fake intake answers


# -- the registry ---------------------------------------------------------------------------------


def test_every_job_kind_has_exactly_one_registered_kind() -> None:
    assert set(KINDS) == set(JobKind)
    for job_kind, kind in KINDS.items():
        assert isinstance(kind, Kind)
        assert kind.kind is job_kind
        assert kind_of(job_kind) is kind
        assert kind.bodies and all(issubclass(body, BaseModel) for body in kind.bodies)
        # One module per kind: the kind's class lives in masactrl_jobs/kinds/<kind>.py.
        assert type(kind).__module__ == f"masactrl_jobs.kinds.{job_kind.value}"


# -- the gateway's half ---------------------------------------------------------------------------


@dataclass
class FakeIntake:
    """Reads every reference as the same small PNG (a video as a probe's answer), recording."""

    reads: list[tuple[str | int, ...]] = field(default_factory=list)
    video: VideoInfo | None = None

    async def read(self, ref: str, loc: Sequence[str | int], what: str = "image") -> ValidatedImage:
        self.reads.append(tuple(loc))
        return validate_image(_png(), max_bytes=1 << 20, max_side=4096, what=what)

    async def check(
        self, data: Payload, loc: Sequence[str | int], what: str = "image"
    ) -> ValidatedImage:
        self.reads.append(tuple(loc))
        return validate_image(data, max_bytes=1 << 20, max_side=4096, what=what)

    async def read_video(self, ref: str, loc: Sequence[str | int], max_bytes: int) -> StoredInput:
        self.reads.append(tuple(loc))
        return StoredInput(b"video bytes", "video")

    async def check_video(
        self, data: Payload, loc: Sequence[str | int], max_bytes: int
    ) -> StoredInput:
        self.reads.append(tuple(loc))
        return StoredInput(data, "video")

    async def probe_video(self, video: StoredInput, count_up_to: int) -> VideoInfo:
        assert self.video is not None
        return self.video


LIMITS = SimpleNamespace(
    max_sequence_frames=4,
    max_sequence_bytes=1 << 20,
    max_video_bytes=1 << 20,
    max_video_seconds=5,
    max_image_side=4096,
    max_video_pixels=1 << 27,
)

BODIES: dict[JobKind, BaseModel] = {
    JobKind.edit: EditCreate(image=PNG_URL, source_prompt="a cat", target_prompts=["a dog"]),
    JobKind.synthesis: SynthesisCreate(source_prompt="a cat", target_prompts=["a dog"]),
    JobKind.sequence: SequenceCreate.model_validate(
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "condition": {"model": "canny", "frames": [PNG_URL, PNG_URL]},
        }
    ),
}


@pytest.mark.parametrize("job_kind", list(JobKind))
def test_a_valid_body_passes_the_kinds_checks_and_resolves_with_its_inputs_as_keys(
    job_kind: JobKind,
) -> None:
    kind, body = KINDS[job_kind], BODIES[job_kind]
    assert kind.check(body, ENTRY, LIMITS, None) == []
    intake = FakeIntake()
    inputs = None
    if kind.takes_inputs(body, None):
        inputs = asyncio.run(kind.read_inputs(intake, LIMITS, body, None))
    job = kind.resolve(body, ENTRY, inputs)
    assert (job.width, job.height) == (512, 512)  # the model's defaults, filled in
    assert job.control.start_step == 4
    stored = {item.key for item in inputs.to_store()} if inputs is not None else set()
    named = {job.image, *(job.condition.images if job.condition else [])} - {None}
    assert named == stored


def test_the_synthesis_takes_no_inputs_unless_it_names_images() -> None:
    synthesis = KINDS[JobKind.synthesis]
    assert not synthesis.takes_inputs(BODIES[JobKind.synthesis], None)
    with_mask = SynthesisCreate.model_validate(
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "control": {"mask": {"mode": "manual", "regions": [{"source": "x", "target": "y"}]}},
        }
    )
    assert synthesis.takes_inputs(with_mask, None)


def test_each_kind_reports_its_own_rules_with_field_paths() -> None:
    edit = SynthesisCreate.model_validate(
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "control": {"mask": {"mode": "auto", "source_word": "cow", "target_word": "dog"}},
        }
    )
    assert KINDS[JobKind.synthesis].check(edit, ENTRY, LIMITS, None) == [
        Issue(
            ("body", "control", "mask", "source_word"),
            "source_word 'cow' does not appear in source_prompt",
        )
    ]
    sequence = SequenceCreate.model_validate(
        {"target_prompts": ["a dog"], "condition": {"model": "canny", "frames": [PNG_URL] * 5}}
    )
    found = KINDS[JobKind.sequence].check(sequence, ENTRY, LIMITS, None)
    assert [issue.loc for issue in found] == [
        ("body", "condition", "frames"),
        ("body", "source_prompt"),
    ]


def test_a_sequences_long_video_is_refused_as_too_large_while_reading() -> None:
    body = SequenceCreate.model_validate(
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "condition": {"model": "canny", "video": PNG_URL},
        }
    )
    intake = FakeIntake(video=VideoInfo(duration=9.0, frame_count=90, fps=10.0, width=8, height=8))
    with pytest.raises(Refused) as refused:
        asyncio.run(KINDS[JobKind.sequence].read_inputs(intake, LIMITS, body, None))
    assert refused.value.too_large
    assert refused.value.issue.loc == ("body", "condition", "video")
    assert refused.value.issue.type == "video_too_long"


# -- the worker's half ----------------------------------------------------------------------------


@dataclass
class FakeEngine:
    """Answers each call with images of the asked-for count, recording the call."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    def _answer(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.calls.append((name, args, kwargs))
        image = Image.new("RGB", (16, 16), (10, 20, 30))
        return SimpleNamespace(
            source=image, targets=[image] * len(args[1]), frames=[image] * 3, inverted="x_T"
        )

    def synthesize(self, *args: Any, **kwargs: Any) -> Any:
        return self._answer("synthesize", args, kwargs)

    def edit(self, *args: Any, **kwargs: Any) -> Any:
        return self._answer("edit", args, kwargs)

    def sequence(self, *args: Any, **kwargs: Any) -> Any:
        return self._answer("sequence", args, kwargs)


@dataclass
class FakeInversion:
    inverted: Any = None
    kept: list[Any] = field(default_factory=list)

    def keep(self, fresh: Any) -> None:
        self.kept.append(fresh)


@dataclass
class FakeContext:
    input: JobInput
    objects: dict[str, bytes]
    engine: FakeEngine = field(default_factory=FakeEngine)
    max_sequence_frames: int = 10
    inversions: list[str] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)

    def read(self, key: str, what: str) -> bytes:
        if key not in self.objects:
            raise JobInputError(f"the {what} {key} is no longer in storage")
        return self.objects[key]

    def decode(self, data: bytes, what: str, mode: str = "RGB") -> Image.Image:
        return Image.open(io.BytesIO(data)).convert(mode)

    @property
    def video_budget(self) -> VideoBudget:
        return VideoBudget.defaults(self.max_sequence_frames)

    def preprocess(self, image: Image.Image, preprocess: Preprocess) -> Image.Image:
        return image

    def engine_options(self) -> dict[str, Any]:
        return {"seed": self.input.seed}

    def masks(self) -> Any:
        return None

    def condition_model(self, name: str) -> Any:
        return f"model {name}"

    def condition(
        self,
        model: Any,
        images: Sequence[Image.Image],
        requested: ConditionInput,
        source_image: Image.Image | None = None,
    ) -> Any:
        return (model, len(images))

    def inversion(self, image_sha256: str) -> FakeInversion:
        self.inversions.append(image_sha256)
        return FakeInversion()

    def frames_done(self, count: int) -> None:
        self.frames.append(count)


def _job(**overrides: Any) -> JobInput:
    values: dict[str, Any] = {
        "source_prompt": "a cat",
        "target_prompts": ["a dog"],
        "seed": 7,
        "steps": 3,
        "guidance_scale": 7.5,
        "width": 16,
        "height": 16,
        "control": ControlInput(start_step=1, start_layer=10),
    }
    values.update(overrides)
    return JobInput(**values)


RUNS: dict[JobKind, tuple[JobInput, str, list[str]]] = {
    JobKind.edit: (_job(image="inputs/photo.png"), "edit", ["source", "target"]),
    JobKind.synthesis: (_job(), "synthesize", ["source", "target"]),
    JobKind.sequence: (
        _job(condition=ConditionInput(model="canny", images=["inputs/a.png"] * 3)),
        "sequence",
        ["source", "frame", "frame", "frame", "animation", "animation"],
    ),
}


@pytest.mark.parametrize("job_kind", list(JobKind))
def test_each_kind_runs_its_engine_call_and_lists_its_results(job_kind: JobKind) -> None:
    job, method, roles = RUNS[job_kind]
    kind = KINDS[job_kind]
    ctx = FakeContext(job, {"inputs/photo.png": _png(), "inputs/a.png": _png()})
    source = kind.load(ctx)
    ran = kind.run(ctx, source)
    assert [call[0] for call in ctx.engine.calls] == [method]
    assert ctx.engine.calls[0][2]["seed"] == 7  # the shared options reach the engine
    outputs = kind.outputs(job, ran)
    shown = [
        output.role.value if isinstance(output, ImageOutput) else "animation" for output in outputs
    ]
    assert shown == roles
    assert kind.preview_role is (
        ImageRole.frame if job_kind is JobKind.sequence else ImageRole.target
    )


def test_an_edit_inverts_its_photo_through_the_cache_and_keeps_the_fresh_inversion() -> None:
    ctx = FakeContext(_job(image="inputs/photo.png"), {"inputs/photo.png": _png()})
    edit = KINDS[JobKind.edit]
    source = edit.load(ctx)
    assert isinstance(source, Source) and source.image is not None
    edit.run(ctx, source)
    assert ctx.inversions == [source.sha256]
    assert ctx.engine.calls[0][1][0] is source.image


def test_an_edit_without_its_photo_fails_as_the_jobs_input() -> None:
    ctx = FakeContext(_job(image="inputs/gone.png"), {})
    with pytest.raises(JobInputError, match="input image inputs/gone.png is no longer in storage"):
        KINDS[JobKind.edit].load(ctx)
    with pytest.raises(JobInputError, match="the edit has no input image"):
        KINDS[JobKind.edit].load(FakeContext(_job(), {}))


def test_a_sequence_reports_its_frames_and_encodes_both_animations() -> None:
    job = _job(
        condition=ConditionInput(model="canny", images=["inputs/a.png"] * 3), animation_fps=4
    )
    ctx = FakeContext(job, {"inputs/a.png": _png()})
    sequence = KINDS[JobKind.sequence]
    ran = sequence.run(ctx, sequence.load(ctx))
    name, args, kwargs = ctx.engine.calls[0]
    assert args[2] == ("model canny", 3)  # the condition holds the three frames
    kwargs["on_frame"](0, None)
    assert ctx.frames == [0, 1]
    animations = [o for o in sequence.outputs(job, ran) if isinstance(o, AnimationOutput)]
    assert [a.extension for a in animations] == ["mp4", "webp"]
    assert all(a.data and a.size == (16, 16) for a in animations)
    assert ctx.inversions == []  # a synthesized source has nothing to invert
