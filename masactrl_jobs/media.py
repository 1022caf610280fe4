"""Frames in and animations out for sequences: image files, folders, videos, MP4 and WebP.

Torch-free, so the gateway can check an upload (``probe_video`` reads headers only: duration,
frame count and size, before a single frame is decoded) and the worker and CLI can read the
condition frames and write the results with the same code.

Videos go through PyAV, whose wheel brings its own FFmpeg (with libx264): no system ffmpeg is
needed. ``decode_video(fps=F)`` samples the frame shown at each time 0, 1/F, 2/F, ... (a frame
is taken when its timestamp reaches the next sample time, within half a source frame), so a
lower rate drops frames evenly and a higher one never duplicates them. ``encode_mp4`` writes
H.264 in yuv420p, which needs even sides: an odd side is padded by repeating its last pixel row
or column. ``encode_webp`` writes an animated WebP with Pillow; frame durations are whole
milliseconds that add up to ``k / fps`` after frame k, so the clip does not drift; libwebp
merges identical consecutive frames into one longer frame (the timing stays the same).

Every failure on a file the caller gave is a :class:`MediaError` with one sentence.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from PIL import Image, UnidentifiedImageError

__all__ = [
    "FRAME_SUFFIXES",
    "MediaError",
    "VideoInfo",
    "common_size",
    "decode_video",
    "encode_mp4",
    "encode_webp",
    "probe_video",
    "read_frame_dir",
    "read_frames",
    "webp_durations",
]

# Files a frame folder may hold; anything else in it (a README, .DS_Store) is ignored.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

VideoSource = str | os.PathLike[str] | bytes


class MediaError(ValueError):
    """A frame file, folder or video that cannot be used, said in one sentence."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video's headers say: enough to enforce limits before decoding."""

    duration: float  # seconds
    frame_count: int
    width: int
    height: int
    fps: float

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


# -- reading frames -------------------------------------------------------------------------


def read_frames(paths: Sequence[str | os.PathLike[str]]) -> list[Image.Image]:
    """The images at ``paths``, in the given order, fully loaded."""
    if not paths:
        raise MediaError("no frames were given")
    return [_read_image(Path(path)) for path in paths]


def read_frame_dir(folder: str | os.PathLike[str]) -> list[Image.Image]:
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
    return [_read_image(path) for path in paths]


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            loaded: Image.Image = image.copy()
            return loaded
    except FileNotFoundError:
        raise MediaError(f"the frame {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(f"the frame {path} is not a readable image ({error})") from None


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


def probe_video(source: VideoSource) -> VideoInfo:
    """Duration, frame count, size and rate from the headers, without decoding frames."""
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
        # Some containers do not store a count: the rate times the duration is what they hold.
        frame_count = stream.frames or round(duration * fps)
        context = stream.codec_context
        return VideoInfo(duration, int(frame_count), context.width, context.height, fps)
    finally:
        container.close()


def decode_video(
    source: VideoSource, *, fps: float | None = None, max_frames: int | None = None
) -> list[Image.Image]:
    """RGB frames of the first video stream, sampled at ``fps`` (default: every frame)."""
    if fps is not None and not fps > 0:
        raise MediaError(
            f"the sampling rate must be a positive number of frames a second, got {fps}"
        )
    if max_frames is not None and max_frames < 1:
        raise MediaError(f"max_frames must be at least 1, got {max_frames}")
    container = _open(source)
    frames: list[Image.Image] = []
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        half_frame = 0.5 / float(rate) if rate else 0.0
        for frame in _decoded(container, stream, source):
            if max_frames is not None and len(frames) >= max_frames:
                break
            if fps is not None and frame.time is not None:
                next_sample = len(frames) / fps
                if frame.time + half_frame < next_sample:
                    continue  # shown before the next sample time
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
