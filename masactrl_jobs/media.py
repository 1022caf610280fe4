"""Frames in and animations out for sequences: image files, folders, videos, MP4 and WebP.

Torch-free, so the gateway can check an upload and the worker and CLI can read the condition
frames and write the results with the same code.

Every decode here is checked before it allocates, because a few kilobytes of video or PNG can
describe gigabytes of pixels (2 frames of 8192×8192 are a 16 KB MP4 and 400 MB decoded; a raw
``.h264`` stream has no duration and no frame count at all, so limits that trust the headers
pass it). The rules, one home for the gateway, the worker and the CLI:

- an image's size comes from its header (:func:`open_image`), a video's from the coded size of
  its stream, and either side past ``max_side`` is refused before a pixel is decoded;
- a video's frames are counted by demuxing its packets (:func:`probe_video`), never taken from the
  container's metadata, and the counting stops one past what could be kept;
- :func:`check_video` turns the count, the sampling and the size into the frames decoding would
  keep and refuses more than ``max_frames`` of them, or more than ``max_pixels`` pixels together;
- :func:`decode_video` runs those checks first, tells FFmpeg to refuse any frame larger than
  ``max_side`` squared (a stream may change its size midway), and keeps a running total, so even
  a video whose timestamps lie stops at the budget.

Videos go through PyAV, whose wheel brings its own FFmpeg (with libx264): no system ffmpeg is
needed. ``decode_video(fps=F)`` samples the frame shown at each time 0, 1/F, 2/F, ... (a frame
is taken when its timestamp reaches the next sample time, within half a source frame), so a
lower rate drops frames evenly and a higher one never duplicates them. ``encode_mp4`` writes
H.264 in yuv420p, which needs even sides: an odd side is padded by repeating its last pixel row
or column. ``encode_webp`` writes an animated WebP with Pillow; frame durations are whole
milliseconds that add up to ``k / fps`` after frame k, so the clip does not drift; libwebp
merges identical consecutive frames into one longer frame (the timing stays the same).

Every failure on a file the caller gave is a :class:`MediaError` with one sentence; one over a
limit is its subclass :class:`OverBudget`, which names the kind of limit for the API's error type.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from PIL import Image, UnidentifiedImageError

from masactrl_jobs.settings import CommonSettings

__all__ = [
    "FRAME_SUFFIXES",
    "MediaError",
    "OverBudget",
    "VideoBudget",
    "VideoInfo",
    "check_video",
    "common_size",
    "decode_video",
    "encode_mp4",
    "encode_webp",
    "frames_kept",
    "open_image",
    "probe_video",
    "read_frame_dir",
    "read_frames",
    "webp_durations",
]

# Files a frame folder may hold; anything else in it (a README, .DS_Store) is ignored.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

VideoSource = str | os.PathLike[str] | bytes


ImageSource = str | os.PathLike[str] | bytes


class MediaError(ValueError):
    """A frame file, folder or video that cannot be used, said in one sentence."""


class OverBudget(MediaError):
    """A video or image past a limit; ``type`` is the API's error type for it."""

    def __init__(self, message: str, type: str) -> None:
        super().__init__(message)
        self.type = type


def _default(name: str) -> int:
    """A limit's default, from its one home (the settings), for callers without settings."""
    value = CommonSettings.model_fields[name].default
    assert isinstance(value, int)
    return value


@dataclass(frozen=True)
class VideoBudget:
    """What decoding one video may cost: checked before the first frame is decoded.

    ``max_side`` bounds each side of a frame, as it does a still image's (so one frame is never
    more than ``max_side²`` pixels); ``max_frames`` bounds the frames kept and ``max_pixels`` the
    pixels they hold together (3 bytes each as RGB).
    """

    max_side: int
    max_frames: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: CommonSettings, max_frames: int) -> VideoBudget:
        """The budget a process's settings give, with its own frame limit."""
        return cls(settings.max_image_side, max_frames, settings.max_video_pixels)

    @classmethod
    def defaults(cls, max_frames: int) -> VideoBudget:
        """The settings' default budget (the CLI, which has no settings of its own)."""
        return cls(_default("max_image_side"), max_frames, _default("max_video_pixels"))

    @property
    def max_frame_pixels(self) -> int:
        return self.max_side * self.max_side


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, enough to enforce limits before decoding.

    ``frame_count`` is the packets counted by demuxing, at most the ``count_up_to + 1`` asked
    for (``more``: the counting stopped there, and the video holds more). ``timed``: the packets
    carry timestamps (a raw ``.h264`` stream has none, so sampling by rate keeps every frame).
    """

    duration: float  # seconds; 0 when the container does not say
    frame_count: int
    width: int
    height: int
    fps: float
    timed: bool = True
    more: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


# -- reading frames -------------------------------------------------------------------------


def open_image(
    source: ImageSource,
    *,
    what: str = "image",
    mode: str | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """The image at ``source`` (a path or bytes), decoded fully, its size checked first.

    Pillow reads the header on open and the pixels on ``load``: a side past ``max_side`` (the
    settings' ``max_image_side`` when None) is refused in between, before any pixel is decoded.
    ``mode`` converts the result ("RGB", "L"); None keeps the file's own.
    """
    limit = _default("max_image_side") if max_side is None else max_side
    named = what if isinstance(source, bytes) else f"{what} {os.fspath(source)}"
    file: Any = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    try:
        with Image.open(file) as image:
            width, height = image.size
            if width > limit or height > limit:
                raise OverBudget(
                    f"the {named} is {width}×{height} pixels; the limit is {limit}×{limit}",
                    "image_too_large",
                )
            image.load()
            loaded: Image.Image = image.convert(mode) if mode is not None else image.copy()
            return loaded
    except FileNotFoundError:
        raise MediaError(f"the {named} does not exist") from None
    except Image.DecompressionBombError as error:
        raise OverBudget(
            f"the {named} is too large to decode ({error})", "image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise MediaError(
            f"the {named} is not a readable image: it is not an image file Pillow knows"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, MediaError):
            raise
        # Truncated or corrupt files surface as OSError or SyntaxError from the decoders.
        raise MediaError(f"the {named} is not a readable image ({error})") from None


def read_frames(
    paths: Sequence[str | os.PathLike[str]], *, max_side: int | None = None
) -> list[Image.Image]:
    """The images at ``paths``, in the given order, fully loaded (each checked on opening)."""
    if not paths:
        raise MediaError("no frames were given")
    return [_read_image(Path(path), max_side) for path in paths]


def read_frame_dir(
    folder: str | os.PathLike[str], *, max_side: int | None = None
) -> list[Image.Image]:
    """The image files of ``folder`` (see ``FRAME_SUFFIXES``), sorted by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"the frame folder {folder} does not exist or is not a folder")
    paths = sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in FRAME_SUFFIXES
    )
    if not paths:
        raise MediaError(
            f"the frame folder {folder} holds no image files ({', '.join(FRAME_SUFFIXES)})"
        )
    return [_read_image(path, max_side) for path in paths]


def _read_image(path: Path, max_side: int | None) -> Image.Image:
    return open_image(path, what="frame", max_side=max_side)


def common_size(frames: Sequence[Image.Image]) -> tuple[int, int]:
    """The (width, height) all ``frames`` share; frames of different sizes are an error."""
    sizes = list(dict.fromkeys(frame.size for frame in frames))
    if not sizes:
        raise MediaError("no frames were given")
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes[:4])
        raise MediaError(f"the frames have different sizes ({listed}); give a target size")
    return sizes[0]


# -- videos ---------------------------------------------------------------------------------


def _describe(source: VideoSource) -> str:
    return "the video" if isinstance(source, bytes) else f"the video {os.fspath(source)}"


def _open(source: VideoSource) -> Any:
    """An input container (PyAV's is untyped), or a MediaError saying why not."""
    try:
        file: Any = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        container = av.open(file, mode="r")
    except FileNotFoundError:
        raise MediaError(f"{_describe(source)} does not exist") from None
    except (av.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f"{_describe(source)} cannot be read as a video ({error})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{_describe(source)} has no video stream")
    return container


def probe_video(source: VideoSource, *, count_up_to: int | None = None) -> VideoInfo:
    """Size, rate and duration from the stream, and the frames counted by demuxing its packets.

    No frame is decoded. Counting stops at ``count_up_to + 1`` packets (``VideoInfo.more``), so
    a long video costs no more to probe than a short one; None counts them all (a video the
    caller made).
    """
    container = _open(source)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        context = stream.codec_context
        count, timed = 0, False
        try:
            for packet in container.demux(stream):
                # The flush packet at the end has no data; a frame always has some.
                if packet.size:
                    count += 1
                    timed = timed or packet.pts is not None
                    if count_up_to is not None and count > count_up_to:
                        break
        except av.FFmpegError as error:
            raise MediaError(f"{_describe(source)} cannot be read as a video ({error})") from None
        return VideoInfo(
            duration,
            count,
            context.width,
            context.height,
            fps,
            timed=timed,
            more=count_up_to is not None and count > count_up_to,
        )
    finally:
        container.close()


def frames_kept(info: VideoInfo, *, fps: float | None, max_frames: int | None) -> int:
    """At most how many frames decoding ``info`` at ``fps`` keeps, ``max_frames`` at most.

    Sampling never repeats a frame, so the count bounds it; a rate over a video with a known
    duration keeps one frame per sample time. A video with no timestamps keeps every frame.
    """
    count = info.frame_count
    if fps is not None and info.timed and info.duration > 0:
        count = min(count, math.floor(info.duration * fps + 1e-6) or 1)
    return min(count, max_frames) if max_frames is not None else count


def check_video(
    info: VideoInfo, budget: VideoBudget, *, fps: float | None, max_frames: int | None
) -> int:
    """The frames decoding ``info`` keeps, or :class:`OverBudget` when they exceed ``budget``.

    ``info`` must come from :func:`probe_video` with ``count_up_to`` at least the frames that
    could be kept (``max_frames``, else ``budget.max_frames``).
    """
    width, height = info.size
    if width <= 0 or height <= 0:
        raise MediaError("the video does not say the size of its frames")
    side = budget.max_side
    if width > side or height > side:
        raise OverBudget(
            f"the video's frames are {width}×{height} pixels; the limit is {side}×{side}",
            "video_too_large",
        )
    kept = frames_kept(info, fps=fps, max_frames=max_frames)
    if kept > budget.max_frames:
        given = f"more than {kept - 1}" if info.more and kept == info.frame_count else str(kept)
        raise OverBudget(
            f"the video gives {given} frames at this sampling; a sequence takes at most "
            f"{budget.max_frames}",
            "too_many_frames",
        )
    if kept * width * height > budget.max_pixels:
        raise OverBudget(
            f"the video's {kept} frames of {width}×{height} are {kept * width * height:,} pixels "
            f"decoded; the limit is {budget.max_pixels:,}",
            "video_too_large",
        )
    return kept


def decode_video(
    source: VideoSource,
    *,
    budget: VideoBudget,
    fps: float | None = None,
    max_frames: int | None = None,
) -> list[Image.Image]:
    """RGB frames of the first video stream, sampled at ``fps`` (default: every frame).

    :func:`check_video` refuses a video over ``budget`` before any frame is decoded; while
    decoding, FFmpeg refuses frames larger than a frame may be and the frames kept stay within
    the budget even when the stream changes its size or its timestamps lie.
    """
    if fps is not None and not fps > 0:
        raise MediaError(
            f"the sampling rate must be a positive number of frames a second, got {fps}"
        )
    if max_frames is not None and max_frames < 1:
        raise MediaError(f"max_frames must be at least 1, got {max_frames}")
    # Past the budget's frames nothing more need be counted: the video is refused either way.
    count_up_to = min(max_frames or budget.max_frames, budget.max_frames)
    check_video(
        probe_video(source, count_up_to=count_up_to), budget, fps=fps, max_frames=max_frames
    )
    container = _open(source)
    frames: list[Image.Image] = []
    pixels = 0
    try:
        stream = container.streams.video[0]
        # FFmpeg's own limit: a larger frame is refused before its buffers are allocated.
        stream.codec_context.options = {"max_pixels": str(budget.max_frame_pixels)}
        rate = stream.average_rate or stream.guessed_rate
        half_frame = 0.5 / float(rate) if rate else 0.0
        for frame in _decoded(container, stream, source):
            if max_frames is not None and len(frames) >= max_frames:
                break
            if fps is not None and frame.time is not None:
                next_sample = len(frames) / fps
                if frame.time + half_frame < next_sample:
                    continue  # shown before the next sample time
            if frame.width > budget.max_side or frame.height > budget.max_side:
                raise OverBudget(
                    f"{_describe(source)} changes its frames to {frame.width}×{frame.height} "
                    f"pixels; the limit is {budget.max_side}×{budget.max_side}",
                    "video_too_large",
                )
            pixels += frame.width * frame.height
            if len(frames) >= budget.max_frames or pixels > budget.max_pixels:
                raise OverBudget(
                    f"{_describe(source)} gives more frames than its headers said; a sequence "
                    f"takes at most {budget.max_frames} frames and {budget.max_pixels:,} pixels",
                    "too_many_frames",
                )
            frames.append(frame.to_image())
    finally:
        container.close()
    if not frames:
        raise MediaError(f"{_describe(source)} holds no decodable frames")
    return frames


def _decoded(container: Any, stream: Any, source: VideoSource) -> Iterator[Any]:
    try:
        yield from container.decode(stream)
    except av.FFmpegError as error:
        raise MediaError(f"{_describe(source)} could not be decoded ({error})") from None


# -- writing animations ---------------------------------------------------------------------


def _check_animation(frames: Sequence[Image.Image], fps: float) -> tuple[int, int]:
    if not fps > 0:
        raise MediaError(f"fps must be a positive number, got {fps}")
    return common_size(frames)


def _even(image: Image.Image) -> Image.Image:
    """``image`` with odd sides padded by one repeated edge row or column (yuv420p needs even)."""
    width, height = image.size
    even = (width + width % 2, height + height % 2)
    if even == image.size:
        return image
    padded = Image.new(image.mode, even)
    padded.paste(image, (0, 0))
    if even[0] > width:
        padded.paste(image.crop((width - 1, 0, width, height)), (width, 0))
    if even[1] > height:
        padded.paste(padded.crop((0, height - 1, even[0], height)), (0, height))
    return padded


def encode_mp4(frames: Sequence[Image.Image], fps: float) -> bytes:
    """H.264 (libx264, yuv420p) in MP4 at ``fps``; odd sides are padded to even."""
    _check_animation(frames, fps)
    rate = Fraction(fps).limit_denominator(1001)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        first = _even(frames[0].convert("RGB"))
        stream.width, stream.height = first.size
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_image(_even(image.convert("RGB")))  # type: ignore[no-untyped-call]
            frame.pts = index
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return buffer.getvalue()


def webp_durations(count: int, fps: float) -> list[int]:
    """Whole-millisecond durations whose running sums stay within half a millisecond of k/fps."""
    ends = [round((k + 1) * 1000 / fps) for k in range(count)]
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def encode_webp(frames: Sequence[Image.Image], fps: float) -> bytes:
    """An animated WebP at ``fps`` that loops forever (lossless, so frames survive exactly)."""
    _check_animation(frames, fps)
    images = [image.convert("RGB") for image in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=webp_durations(len(images), fps),
        loop=0,
        lossless=True,
    )
    return buffer.getvalue()
