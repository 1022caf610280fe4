"""The sequence: K consistent frames from one source and K condition frames or a video
(``POST /v1/sequences``).

A sequence is one source (a prompt, or a photo that is inverted) and K condition frames, given as
images or as one video. Parameters: ``SequenceCreate`` (JSON, every input by reference) or
``SequenceParams`` with :class:`SequenceFiles` (multipart: frames, a video, a photo). Everything
that can be known before work starts is checked at the gateway, with field paths, so a refused
sequence costs no GPU time and stores nothing:

- the shared rules of ``masactrl_jobs.control`` (control, size, the condition's window, scale and
  preprocessing, and :func:`~masactrl_jobs.control.sequence_problems` for the frames);
- the frame count against ``max_sequence_frames`` (422), and the frames' (or the video's) total
  bytes against ``max_sequence_bytes`` (413);
- ``condition.max_frames`` past ``max_sequence_frames`` is a 422;
- a video is probed (``masactrl_jobs.media.probe_video``: the stream's coded size, and its frames
  counted by demuxing packets, never from the container's metadata) and checked against the
  budget a worker decodes under (``masactrl_jobs.media.check_video``): unreadable is a 422,
  longer than ``max_video_seconds`` a 413, frames past ``max_image_side`` a side, more frames
  than the limit at its sampling, or more than ``max_video_pixels`` pixels in the frames kept, a
  422. The worker checks the same budget again before it decodes a frame.

Frames of different sizes are fine: the engine fits each to the output size. The results are the
source, every frame, and the frames as an MP4 and an animated WebP.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from masactrl_jobs.catalog import ModelEntry
from masactrl_jobs.control import (
    CONDITION_SCALE_RULE,
    CONDITION_WINDOW_RULE,
    SEQUENCE_FRAME_COUNT_RULE,
    SEQUENCE_FRAMES_RULE,
    SEQUENCE_MAX_FRAMES_RULE,
    SEQUENCE_PROMPTS_RULE,
    SEQUENCE_SAMPLING_RULE,
    Rule,
    condition_problems,
    resolve_control,
    resolve_loras,
    resolve_size,
    sequence_problems,
)
from masactrl_jobs.images import (
    Payload,
    StoredInput,
    ValidatedImage,
    payload_size,
    too_large_message,
)
from masactrl_jobs.kinds.base import (
    BODY,
    CONDITION_MODEL_RULE,
    PARAMETER_RULES,
    AnimationOutput,
    ImageOutput,
    Intake,
    Issue,
    JobInputError,
    Kind,
    Limits,
    Output,
    Ran,
    Refused,
    RunContext,
    Source,
    condition_model_issues,
    issues,
    parameter_issues,
    random_seed,
    read_source,
)
from masactrl_jobs.media import (
    MediaError,
    OverBudget,
    VideoBudget,
    check_video,
    decode_video,
    encode_mp4,
    encode_webp,
)
from masactrl_jobs.schema import (
    ConditionInput,
    ImageRole,
    JobInput,
    JobKind,
    MaskMode,
    SequenceCreate,
    SequenceParams,
)

__all__ = [
    "DEFAULT_ANIMATION_FPS",
    "SEQUENCE",
    "SEQUENCE_FAMILY_RULE",
    "SIZE_LIMIT_RULE",
    "SOURCE_RULES",
    "SequenceFiles",
    "SequenceInputs",
    "SequenceKind",
]

# The animations' frame rate when a job does not say (jobs made by the gateway always do).
DEFAULT_ANIMATION_FPS = 8.0

_CONDITION = (BODY, "condition")


@dataclass(frozen=True)
class SequenceFiles:
    """The file parts of a multipart sequence: frames in order, or one video; and a source.

    Each part is its bytes or the temporary file the upload was spooled to (the route passes
    the files: a 100 MB video is never read into memory).
    """

    frames: Sequence[Payload] = ()
    video: Payload | None = None
    image: Payload | None = None

    def sha256(self) -> str:
        """One digest of the parts, for the request hash."""
        digest = hashlib.sha256()
        for part in [self.image, self.video, *self.frames]:
            # Lengths first, so that moving bytes from one part to the next changes the digest.
            digest.update(b"-" if part is None else f"{payload_size(part)}:".encode())
            if part is not None:
                _update(digest, part)
        return digest.hexdigest()


def _update(digest: Any, part: Payload) -> None:
    """Feed ``part`` to ``digest`` a chunk at a time (the same digest as its bytes)."""
    if isinstance(part, bytes):
        digest.update(part)
        return
    part.seek(0)
    while chunk := part.read(1024 * 1024):
        digest.update(chunk)


@dataclass
class SequenceInputs:
    """A sequence's inputs, read and checked, not yet stored."""

    image: ValidatedImage | None = None
    frames: list[ValidatedImage] = field(default_factory=list)
    video: StoredInput | None = None

    def to_store(self) -> list[ValidatedImage | StoredInput]:
        """Everything to put under ``inputs/`` once every check has passed."""
        image = [self.image] if self.image is not None else []
        video = [self.video] if self.video is not None else []
        return [*image, *self.frames, *video]


def _image_given(body: SequenceParams, files: SequenceFiles | None) -> bool:
    return (isinstance(body, SequenceCreate) and body.image is not None) or (
        files is not None and files.image is not None
    )


def _too_large(message: str, loc: tuple[str | int, ...], type: str = "too_large") -> Refused:
    """A 413 that names the field, like a 422 does."""
    return Refused(Issue(loc, message, type), too_large=True)


# The sequence's own rules, beside the shared ones its check applies.
SEQUENCE_FAMILY_RULE = Rule(
    ("model",),
    "a model whose family runs sequences (`GET /v1/models`: `features.sequences`; not SD3 or "
    "FLUX.1).",
)
SOURCE_RULES = (
    Rule(("source_prompt",), "not empty when no `image` is the source (a synthesized source)."),
    Rule(("anchor_source",), "needs an `image` as the source."),
    Rule(("control.mask.mode",), "stays `none`: masks are not available for sequences."),
)
SIZE_LIMIT_RULE = Rule(
    ("condition.frames", "condition.video"),
    "413 past {max_sequence_bytes:,} bytes of frames together, or a video past "
    "{max_video_bytes:,} bytes or {max_video_seconds:g} seconds.",
)
VIDEO_BUDGET_RULE = Rule(
    ("condition.video",),
    "frames at most {max_image_side} pixels a side (the stream's coded size), counted by "
    "demuxing; the frames its sampling keeps hold at most {max_video_pixels:,} pixels together.",
)


class SequenceKind(Kind[SequenceParams, SequenceFiles, SequenceInputs]):
    kind = JobKind.sequence
    bodies = (SequenceCreate, SequenceParams)
    preview_role = ImageRole.frame
    rules = (
        SEQUENCE_FAMILY_RULE,
        *PARAMETER_RULES,
        SEQUENCE_FRAMES_RULE,
        SEQUENCE_FRAME_COUNT_RULE,
        SEQUENCE_SAMPLING_RULE,
        SEQUENCE_MAX_FRAMES_RULE,
        SEQUENCE_PROMPTS_RULE,
        CONDITION_MODEL_RULE,
        CONDITION_WINDOW_RULE,
        CONDITION_SCALE_RULE,
        *SOURCE_RULES,
        SIZE_LIMIT_RULE,
        VIDEO_BUDGET_RULE,
    )

    # -- at the gateway

    def files_digest(self, files: SequenceFiles) -> str | None:
        return files.sha256()

    def check(
        self,
        body: SequenceParams,
        entry: ModelEntry,
        limits: Limits,
        files: SequenceFiles | None,
    ) -> list[Issue]:
        features = entry.features
        if not features.sequences:
            # Nothing else about the request matters on this model.
            message = f"{entry.name} is a {entry.family} model, and {features.unavailable}"
            return [Issue((BODY, "model"), message, "unsupported_feature")]
        condition = body.condition
        # The window, scale and preprocessing rules are the conditions' own; a sequence's frames
        # stand in for the images, whose count sequence_problems checks below.
        problems = condition_problems(
            targets=1,
            images=1,
            has_source_image=False,
            editing=False,
            scale=condition.scale,
            start=condition.start,
            end=condition.end,
            preprocess=condition.preprocess,
        )
        frame_parts = len(files.frames) if files is not None else 0
        frames = len(condition.frames) if condition.frames is not None else frame_parts or None
        has_video = condition.video is not None or (files is not None and files.video is not None)
        problems += sequence_problems(
            frames=frames,
            has_video=has_video,
            targets=len(body.target_prompts),
            max_frames=limits.max_sequence_frames,
            sampled=condition.fps is not None or condition.max_frames is not None,
            sample_frames=condition.max_frames,
        )
        found = parameter_issues(entry, body) + issues(problems)
        found += condition_model_issues(entry, condition.model)
        if body.control.mask.mode is not MaskMode.none:
            found.append(
                Issue(
                    (BODY, "control", "mask", "mode"),
                    "masks are not available for sequences; leave the mask mode 'none'",
                )
            )
        if body.anchor_source and not _image_given(body, files):
            found.append(
                Issue((BODY, "anchor_source"), "anchor_source needs an image as the source")
            )
        if not _image_given(body, files) and not body.source_prompt.strip():
            found.append(
                Issue(
                    (BODY, "source_prompt"),
                    "a synthesized source needs a source_prompt (or send an image as the source)",
                )
            )
        return found

    def takes_inputs(self, body: SequenceParams, files: SequenceFiles | None) -> bool:
        return True  # the frames or the video

    async def read_inputs(
        self,
        intake: Intake,
        limits: Limits,
        body: SequenceParams,
        files: SequenceFiles | None,
    ) -> SequenceInputs:
        inputs = SequenceInputs()
        if files is not None and files.image is not None:
            inputs.image = await intake.check(files.image, (BODY, "image"))
        elif isinstance(body, SequenceCreate) and body.image is not None:
            inputs.image = await intake.read(body.image, (BODY, "image"))
        condition = body.condition
        total = 0
        if condition.frames is not None or (files is not None and files.frames):
            loc = (*_CONDITION, "frames")
            refs = condition.frames or []
            count = len(refs) if refs else len(files.frames if files else ())
            for k in range(count):
                if refs:
                    frame = await intake.read(refs[k], (*loc, k), "condition frame")
                else:
                    assert files is not None
                    frame = await intake.check(files.frames[k], (*loc, k), "condition frame")
                total += payload_size(frame.data)
                if total > limits.max_sequence_bytes:
                    limit = limits.max_sequence_bytes
                    raise _too_large(too_large_message("the frames", total, limit), loc)
                inputs.frames.append(frame)
            return inputs
        loc = (*_CONDITION, "video")
        if files is not None and files.video is not None:
            size = payload_size(files.video)
            if size > limits.max_video_bytes:
                message = too_large_message("video", size, limits.max_video_bytes)
                raise _too_large(message, loc)
            video = await intake.check_video(files.video, loc, limits.max_video_bytes)
        else:
            assert condition.video is not None  # check() asked for frames or a video
            video = await intake.read_video(condition.video, loc, limits.max_video_bytes)
        budget = VideoBudget(
            limits.max_image_side, limits.max_sequence_frames, limits.max_video_pixels
        )
        # One past what could be kept is enough to refuse: the counting stops there.
        count_up_to = min(condition.max_frames or budget.max_frames, budget.max_frames)
        try:
            info = await intake.probe_video(video, count_up_to)
        except MediaError as exc:
            raise Refused(Issue(loc, str(exc), "invalid_video")) from None
        if info.duration > limits.max_video_seconds:
            message = (
                f"the video lasts {info.duration:.1f} s; the limit is "
                f"{limits.max_video_seconds:g} s"
            )
            raise _too_large(message, loc, "video_too_long")
        try:
            check_video(info, budget, fps=condition.fps, max_frames=condition.max_frames)
        except OverBudget as exc:
            hint = " (set condition.fps or condition.max_frames)"
            message = str(exc) + (hint if exc.type == "too_many_frames" else "")
            raise Refused(Issue(loc, message, exc.type)) from None
        except MediaError as exc:
            raise Refused(Issue(loc, str(exc), "invalid_video")) from None
        inputs.video = video
        return inputs

    def resolve(
        self, body: SequenceParams, entry: ModelEntry, inputs: SequenceInputs | None
    ) -> JobInput:
        inputs = inputs or SequenceInputs()
        condition = body.condition
        width, height = resolve_size(entry, body.width, body.height)
        return JobInput(
            image=inputs.image.key if inputs.image is not None else None,
            source_prompt=body.source_prompt,
            target_prompts=list(body.target_prompts),
            negative_prompt=body.negative_prompt,
            seed=body.seed if body.seed is not None else random_seed(),
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            width=width,
            height=height,
            control=resolve_control(entry, body.control, body.steps),
            condition=ConditionInput(
                model=condition.model,
                images=[frame.key for frame in inputs.frames],
                scale=condition.scale,
                start=condition.start,
                end=condition.end,
                preprocess=condition.preprocess,
                video=inputs.video.key if inputs.video is not None else None,
                fps=condition.fps,
                max_frames=condition.max_frames,
            ),
            anchor_source=body.anchor_source,
            loras=resolve_loras(entry, body.loras),
            animation_fps=body.fps,
            previews=body.previews,
        )

    # -- on a GPU worker

    def load(self, ctx: RunContext) -> Source:
        # The source is a photo when the job names one, else synthesized like a synthesis's.
        key = ctx.input.image
        return read_source(ctx, key) if key else Source()

    def _condition(self, ctx: RunContext) -> Any:
        """The engine's ``Condition`` holding the sequence's frames (a video decoded here)."""
        requested = ctx.input.condition
        if requested is None:
            raise JobInputError("the sequence has no condition frames")
        model = ctx.condition_model(requested.model)
        if requested.video is not None:
            data = ctx.read(requested.video, "video")
            try:
                # Refused before a frame is decoded when it is over the budget (see media.py).
                frames = decode_video(
                    data,
                    budget=ctx.video_budget,
                    fps=requested.fps,
                    max_frames=requested.max_frames,
                )
            except MediaError as exc:
                raise JobInputError(str(exc)) from None
        else:
            frames = [
                ctx.decode(ctx.read(key, f"condition frame {k}"), f"condition frame {k}")
                for k, key in enumerate(requested.images)
            ]
        frames = [ctx.preprocess(frame, requested.preprocess) for frame in frames]
        return ctx.condition(model, frames, requested)

    def run(self, ctx: RunContext, source: Source) -> Ran:
        job = ctx.input
        condition = self._condition(ctx)
        inversion = ctx.inversion(source.sha256) if source.sha256 is not None else None
        ctx.frames_done(0)
        started = time.perf_counter()
        result = ctx.engine.sequence(
            job.source_prompt,
            job.target_prompts,
            condition,
            image=source.image,
            inverted=inversion.inverted if inversion is not None else None,
            anchor_source=job.anchor_source,
            on_frame=lambda index, frame: ctx.frames_done(index + 1),
            **ctx.engine_options(),
        )
        engine_seconds = time.perf_counter() - started
        if inversion is not None:
            inversion.keep(result.inverted)
        return Ran(result, engine_seconds)

    def outputs(self, job: JobInput, ran: Ran) -> list[Output]:
        frames = ran.result.frames
        prompts = job.target_prompts
        if len(prompts) == 1:
            prompts = prompts * len(frames)
        outputs: list[Output] = [
            ImageOutput(ImageRole.source, 0, job.source_prompt, ran.result.source)
        ]
        outputs += [
            ImageOutput(ImageRole.frame, k, prompt, frame)
            for k, (prompt, frame) in enumerate(zip(prompts, frames, strict=True))
        ]
        fps = job.animation_fps or DEFAULT_ANIMATION_FPS
        outputs += [
            AnimationOutput(extension, job.target_prompts[0], encode(frames, fps), frames[0].size)
            for extension, encode in (("mp4", encode_mp4), ("webp", encode_webp))
        ]
        return outputs


SEQUENCE = SequenceKind()
