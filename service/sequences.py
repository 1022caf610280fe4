"""Sequences at the gateway: their checks, their inputs and the input as it will run.

A sequence is one source (a prompt, or an image that is inverted) and K condition frames, given
as images or as one video. Everything that can be known before work starts is checked here, with
field paths, so a refused sequence costs no GPU time and stores nothing:

- the shared rules of ``masactrl_jobs.control`` (control, size, the condition's window, scale and
  preprocessing, and :func:`~masactrl_jobs.control.sequence_problems` for the frames);
- the frame count against ``max_sequence_frames`` (422), and the frames' (or the video's) total
  bytes against ``max_sequence_bytes`` (413);
- a video is probed from its headers (``masactrl_jobs.media.probe_video``): unreadable is a 422,
  longer than ``max_video_seconds`` a 413, and the frames its sampling would give over the limit
  a 422. The worker decodes it; the engine refuses a count over its own limit again.

Frames of different sizes are fine: the engine fits each to the output size.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from masactrl_jobs.catalog import ModelEntry, UnknownCondition
from masactrl_jobs.control import (
    condition_problems,
    control_problems,
    lora_problems,
    resolve_control,
    resolve_loras,
    resolve_size,
    sequence_problems,
    size_problems,
)
from masactrl_jobs.images import ValidatedImage, too_large_message
from masactrl_jobs.media import MediaError, VideoInfo, probe_video
from masactrl_jobs.schema import (
    MAX_SEED,
    ConditionInput,
    JobInput,
    MaskMode,
    SequenceCreate,
    SequenceParams,
)
from service.config import GatewaySettings
from service.errors import ApiError, FieldError, invalid
from service.intake import ImageIntake, StoredInput

__all__ = ["SequenceInputs", "SequenceUploads", "check_sequence", "read_inputs", "resolve_input"]

SequenceBody = SequenceCreate | SequenceParams
_BODY = "body"
_CONDITION = (_BODY, "condition")


@dataclass(frozen=True)
class SequenceUploads:
    """The file parts of a multipart sequence: frames in order, or one video; and a source."""

    frames: Sequence[bytes] = ()
    video: bytes | None = None
    image: bytes | None = None


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


def _image_given(body: SequenceBody, uploads: SequenceUploads | None) -> bool:
    return (isinstance(body, SequenceCreate) and body.image is not None) or (
        uploads is not None and uploads.image is not None
    )


def check_sequence(
    body: SequenceBody,
    entry: ModelEntry,
    settings: GatewaySettings,
    uploads: SequenceUploads | None = None,
) -> list[FieldError]:
    """Every problem of ``body`` (and its file parts) that needs no input read."""
    problems = control_problems(entry, body.control, body.steps)
    problems += size_problems(entry, body.width, body.height)
    problems += lora_problems(entry, body.loras)
    condition = body.condition
    # The window, scale and preprocessing rules are the conditions' own; a sequence's frames
    # stand in for the images, whose count sequence_problems checks below.
    problems += condition_problems(
        targets=1,
        images=1,
        has_source_image=False,
        editing=False,
        scale=condition.scale,
        start=condition.start,
        end=condition.end,
        preprocess=condition.preprocess,
    )
    frame_parts = len(uploads.frames) if uploads is not None else 0
    frames = len(condition.frames) if condition.frames is not None else frame_parts or None
    has_video = condition.video is not None or (uploads is not None and uploads.video is not None)
    problems += sequence_problems(
        frames=frames,
        has_video=has_video,
        targets=len(body.target_prompts),
        max_frames=settings.max_sequence_frames,
        sampled=condition.fps is not None or condition.max_frames is not None,
    )
    errors = [FieldError((_BODY, *problem.field), problem.message) for problem in problems]
    try:
        entry.condition(condition.model)
    except UnknownCondition as exc:
        errors.append(FieldError((*_CONDITION, "model"), str(exc), "unknown_condition"))
    if body.control.mask.mode is not MaskMode.none:
        errors.append(
            FieldError(
                (_BODY, "control", "mask", "mode"),
                "masks are not available for sequences; leave the mask mode 'none'",
            )
        )
    if body.anchor_source and not _image_given(body, uploads):
        errors.append(
            FieldError((_BODY, "anchor_source"), "anchor_source needs an image as the source")
        )
    if not _image_given(body, uploads) and not body.source_prompt.strip():
        errors.append(
            FieldError(
                (_BODY, "source_prompt"),
                "a synthesized source needs a source_prompt (or send an image as the source)",
            )
        )
    return errors


def _too_large(message: str, loc: Sequence[str | int], type: str = "too_large") -> ApiError:
    """A 413 that names the field, like a 422 does."""
    detail = FieldError(loc, message, type).detail
    return ApiError(
        413, "payload_too_large", message[:1].upper() + message[1:] + ".", details=[detail]
    )


def _expected_frames(info: VideoInfo, fps: float | None, max_frames: int | None) -> int:
    """How many frames decoding ``info`` at ``fps`` would give, at most ``max_frames``."""
    count = info.frame_count if fps is None else math.floor(info.duration * fps + 1e-6) or 1
    return min(count, max_frames) if max_frames is not None else count


async def read_inputs(
    intake: ImageIntake,
    settings: GatewaySettings,
    body: SequenceBody,
    uploads: SequenceUploads | None = None,
) -> SequenceInputs:
    """The source image, frames or video, read and checked; nothing is stored."""
    inputs = SequenceInputs()
    if uploads is not None and uploads.image is not None:
        inputs.image = await intake.check(uploads.image, (_BODY, "image"))
    elif isinstance(body, SequenceCreate) and body.image is not None:
        inputs.image = await intake.read(body.image, (_BODY, "image"))
    condition = body.condition
    total = 0
    if condition.frames is not None or (uploads is not None and uploads.frames):
        loc = (*_CONDITION, "frames")
        refs = condition.frames or []
        count = len(refs) if refs else len(uploads.frames if uploads else ())
        for k in range(count):
            if refs:
                frame = await intake.read(refs[k], (*loc, k), "condition frame")
            else:
                assert uploads is not None
                frame = await intake.check(uploads.frames[k], (*loc, k), "condition frame")
            total += len(frame.data)
            if total > settings.max_sequence_bytes:
                limit = settings.max_sequence_bytes
                raise _too_large(too_large_message("the frames", total, limit), loc)
            inputs.frames.append(frame)
        return inputs
    loc = (*_CONDITION, "video")
    if uploads is not None and uploads.video is not None:
        data = uploads.video
        if len(data) > settings.max_video_bytes:
            raise _too_large(too_large_message("video", len(data), settings.max_video_bytes), loc)
    else:
        assert condition.video is not None  # check_sequence asked for frames or a video
        data = await intake.read_bytes(condition.video, loc, "video", settings.max_video_bytes)
    try:
        info = await run_in_threadpool(probe_video, data)
    except MediaError as exc:
        raise invalid([FieldError(loc, str(exc), "invalid_video")]) from None
    if info.duration > settings.max_video_seconds:
        message = (
            f"the video lasts {info.duration:.1f} s; the limit is {settings.max_video_seconds:g} s"
        )
        raise _too_large(message, loc, "video_too_long")
    expected = _expected_frames(info, condition.fps, condition.max_frames)
    if expected > settings.max_sequence_frames:
        raise invalid(
            [
                FieldError(
                    loc,
                    f"the video gives {expected} frames at this sampling; a sequence takes at most "
                    f"{settings.max_sequence_frames} (set condition.fps or condition.max_frames)",
                    "too_many_frames",
                )
            ]
        )
    inputs.video = StoredInput(data, "video")
    return inputs


def resolve_input(body: SequenceBody, entry: ModelEntry, inputs: SequenceInputs) -> JobInput:
    """The sequence as it will run: defaults from the model, inputs as storage keys.

    ``body`` has passed :func:`check_sequence`.
    """
    condition = body.condition
    width, height = resolve_size(entry, body.width, body.height)
    return JobInput(
        image=inputs.image.key if inputs.image is not None else None,
        source_prompt=body.source_prompt,
        target_prompts=list(body.target_prompts),
        negative_prompt=body.negative_prompt,
        seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1),
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
