"""Media I/O for sequences: frames from files, folders and videos; MP4 and WebP out.

Videos are made here with PyAV (no fixtures on disk, no system ffmpeg) and read back with PyAV
and Pillow, independent of the encoders' own bookkeeping: frame counts, rates and durations are
what a player would see.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from masactrl_jobs import media
from masactrl_jobs.media import (
    MediaError,
    OverBudget,
    VideoBudget,
    check_video,
    common_size,
    decode_video,
    encode_mp4,
    encode_webp,
    open_image,
    probe_video,
    read_frame_dir,
    read_frames,
    webp_durations,
)
from tests.videos import blank_video

# The settings' default budget, with the engine's 120 frames.
BUDGET = VideoBudget.defaults(120)


def frame(index: int, size: tuple[int, int] = (32, 24)) -> Image.Image:
    """A frame whose mean colour encodes ``index``: recognizable after lossy H.264."""
    value = 10 + 18 * index
    array = np.full((size[1], size[0], 3), (value, 255 - value, 128), dtype=np.uint8)
    return Image.fromarray(array)


def index_of(image: Image.Image) -> int:
    return round((np.asarray(image.convert("RGB"))[..., 0].mean() - 10) / 18)


def make_mp4(count: int, fps: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A tiny H.264 MP4 written directly with PyAV, independent of encode_mp4."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(count):
            video_frame = av.VideoFrame.from_ndarray(np.asarray(frame(index, size)), format="rgb24")
            video_frame.pts = index
            video_frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def mp4_facts(data: bytes) -> tuple[int, Fraction, float, list[Image.Image]]:
    """Frames decoded, average rate, duration in seconds, and the frames (PyAV, directly)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        images = [f.to_image() for f in container.decode(stream)]
        duration = float(stream.duration * stream.time_base)
        return len(images), stream.average_rate, duration, images


def webp_facts(data: bytes) -> tuple[int, list[int]]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            image.load()
            durations.append(image.info["duration"])
        return image.n_frames, durations


# -- frames from files ----------------------------------------------------------------------


def test_frames_keep_the_given_order_and_a_folder_is_sorted_by_name(tmp_path):
    names = ["b.png", "a.png", "c.jpg"]
    for index, name in enumerate(names):
        frame(index).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"")
    given = read_frames([tmp_path / name for name in names])
    assert [index_of(image) for image in given] == [0, 1, 2]
    # Sorted: a.png (frame 1), b.png (frame 0), c.jpg (frame 2); other files are skipped.
    assert [index_of(image) for image in read_frame_dir(tmp_path)] == [1, 0, 2]


def test_unreadable_frames_and_folders_are_one_sentence_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(MediaError, match=r"broken\.png is not a readable image"):
        read_frames([tmp_path / "broken.png"])
    with pytest.raises(MediaError, match=r"absent\.png does not exist"):
        read_frames([tmp_path / "absent.png"])
    with pytest.raises(MediaError, match="no frames were given"):
        read_frames([])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="holds no image files"):
        read_frame_dir(empty)
    with pytest.raises(MediaError, match="does not exist or is not a folder"):
        read_frame_dir(tmp_path / "nowhere")


def test_common_size_refuses_mixed_sizes():
    assert common_size([frame(0), frame(1)]) == (32, 24)
    with pytest.raises(MediaError, match=r"different sizes \(32x24, 16x16\); give a target size"):
        common_size([frame(0), frame(1, (16, 16))])


# -- videos in ------------------------------------------------------------------------------


def test_probe_reads_duration_count_and_size_from_headers(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(make_mp4(6, fps=12))
    info = probe_video(path)
    assert (info.frame_count, info.size, info.fps) == (6, (32, 24), 12.0)
    assert info.duration == pytest.approx(0.5)
    assert probe_video(path.read_bytes()) == info


def test_decode_keeps_order_and_samples_by_rate_and_count(tmp_path):
    data = make_mp4(12, fps=12)
    every = decode_video(data, budget=BUDGET)
    assert [index_of(image) for image in every] == list(range(12))
    assert every[0].mode == "RGB" and every[0].size == (32, 24)
    # 4 a second from a 12 fps clip: the frames shown at 0, 0.25, 0.5 and 0.75 s.
    assert [index_of(image) for image in decode_video(data, budget=BUDGET, fps=4)] == [0, 3, 6, 9]
    assert [
        index_of(image) for image in decode_video(data, budget=BUDGET, fps=4, max_frames=2)
    ] == [0, 3]
    # A rate above the clip's never repeats a frame.
    assert len(decode_video(data, budget=BUDGET, fps=30)) == 12
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    assert [index_of(image) for image in decode_video(path, budget=BUDGET, max_frames=5)] == list(
        range(5)
    )


def test_unreadable_videos_are_one_sentence_errors(tmp_path):
    with pytest.raises(MediaError, match="cannot be read as a video"):
        decode_video(b"definitely not a video", budget=BUDGET)
    with pytest.raises(MediaError, match=r"clip\.mp4 does not exist"):
        probe_video(tmp_path / "clip.mp4")
    with pytest.raises(MediaError, match="positive number of frames a second"):
        decode_video(make_mp4(2, fps=4), budget=BUDGET, fps=0)


# -- budgets: checked before a frame is decoded ---------------------------------------------


@pytest.fixture()
def no_decoding(monkeypatch):
    """Decoding a frame fails the test: a refusal must come before any frame is allocated."""

    def refuse(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(media, "_decoded", refuse)


def test_frames_are_counted_by_demuxing_and_the_count_stops_past_the_limit():
    # A raw H.264 stream says nothing: no duration, no frame count, no timestamps.
    raw = blank_video(64, 64, 300, "h264")
    with av.open(io.BytesIO(raw)) as container:
        stream = container.streams.video[0]
        assert (stream.frames, stream.duration, container.duration) == (0, None, None)
    info = probe_video(raw, count_up_to=120)
    assert (info.frame_count, info.more, info.timed, info.size) == (121, True, False, (64, 64))
    assert probe_video(raw).frame_count == 300  # no limit: every packet
    # A container's count agrees with the packets.
    assert probe_video(make_mp4(6, fps=12), count_up_to=120).frame_count == 6


def test_a_video_whose_frames_are_larger_than_an_image_may_be_is_refused_unread(no_decoding):
    bomb = blank_video(8192, 8192, 2)  # about 200 KB; 400 MB of RGB decoded
    info = probe_video(bomb, count_up_to=120)
    with pytest.raises(OverBudget, match="8192×8192 pixels; the limit is 4096×4096") as refused:
        check_video(info, BUDGET, fps=None, max_frames=None)
    assert refused.value.type == "video_too_large"
    with pytest.raises(OverBudget, match="8192×8192 pixels; the limit is 4096×4096"):
        decode_video(bomb, budget=BUDGET)


def test_a_raw_stream_past_the_frame_limit_is_refused_unread(no_decoding):
    raw = blank_video(64, 64, 300, "h264")
    with pytest.raises(OverBudget, match="gives more than 120 frames") as refused:
        decode_video(raw, budget=BUDGET)
    assert refused.value.type == "too_many_frames"
    # A rate cannot thin a stream without timestamps: every frame would be kept.
    with pytest.raises(OverBudget, match="gives more than 120 frames"):
        decode_video(raw, budget=BUDGET, fps=1)
    # max_frames over the limit asks for more than a sequence takes.
    with pytest.raises(OverBudget, match="gives more than 120 frames"):
        decode_video(raw, budget=BUDGET, max_frames=1000)


def test_frames_within_every_limit_alone_are_refused_past_the_pixel_budget(no_decoding):
    # 24 frames of 4096×4096, each a legal frame: 1.2 GB of RGB together.
    raw = blank_video(4096, 4096, 24, "h264")
    with pytest.raises(OverBudget, match=r"24 frames of 4096×4096 are 402,653,184 pixels"):
        decode_video(raw, budget=BUDGET)
    with pytest.raises(OverBudget, match=r"the limit is 134,217,728"):
        decode_video(raw, budget=BUDGET, max_frames=9)


def test_a_stream_that_grows_its_frames_midway_is_stopped_by_the_decoder():
    # 100 frames of 64×64, then an SPS for 1024×1024: the size FFmpeg reports is the first.
    grows = blank_video(64, 64, 100, "h264") + blank_video(1024, 1024, 3, "h264")
    assert probe_video(grows, count_up_to=120).size == (64, 64)
    budget = VideoBudget(max_side=64, max_frames=120, max_pixels=10**9)
    # FFmpeg refuses the larger frame before allocating it (its max_pixels option).
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_video(grows, budget=budget)
    # Allowed 1024 a side, the same stream decodes, and its last frames are that large.
    frames = decode_video(grows, budget=VideoBudget(1024, 120, 10**9))
    assert (len(frames), frames[0].size, frames[-1].size) == (103, (64, 64), (1024, 1024))


def test_a_video_within_the_budget_decodes_what_the_check_said():
    raw = blank_video(64, 64, 300, "h264")
    info = probe_video(raw, count_up_to=10)
    assert check_video(info, BUDGET, fps=None, max_frames=10) == 10
    assert len(decode_video(raw, budget=BUDGET, max_frames=10)) == 10
    small = VideoBudget(max_side=64, max_frames=10, max_pixels=64 * 64 * 10)
    assert len(decode_video(raw, budget=small, max_frames=10)) == 10
    with pytest.raises(OverBudget, match="40,960 pixels decoded; the limit is 36,864"):
        decode_video(raw, budget=VideoBudget(64, 10, 64 * 64 * 9), max_frames=10)


def test_an_image_larger_than_the_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("L", (4097, 8)).save(path)

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    with pytest.raises(OverBudget, match=r"wide\.png is 4097×8 pixels; the limit is 4096×4096"):
        open_image(path, what="frame")
    with pytest.raises(OverBudget, match="image is 4097×8 pixels; the limit is 100×100"):
        open_image(path.read_bytes(), max_side=100)
    with pytest.raises(OverBudget, match="is 4097×8 pixels"):
        read_frames([path])


# -- animations out -------------------------------------------------------------------------


def test_mp4_round_trip_decode_frames_encode(tmp_path):
    source = make_mp4(5, fps=10)
    frames = decode_video(source, budget=BUDGET)
    encoded = encode_mp4(frames, fps=10)
    count, rate, duration, images = mp4_facts(encoded)
    assert (count, rate) == (5, 10)
    assert duration == pytest.approx(0.5)
    assert [index_of(image) for image in images] == list(range(5))
    assert [index_of(image) for image in decode_video(encoded, budget=BUDGET)] == list(range(5))


@pytest.mark.parametrize("fps", [8, 12.5])
def test_animations_have_every_frame_at_the_requested_rate(fps):
    frames = [frame(index, (33, 21)) for index in range(7)]
    count, rate, duration, images = mp4_facts(encode_mp4(frames, fps=fps))
    assert count == 7 and rate == Fraction(fps)
    assert duration == pytest.approx(7 / fps)
    # Odd sides are padded by one repeated edge pixel: the picture itself is untouched.
    assert images[0].size == (34, 22)
    assert [index_of(image.crop((0, 0, 33, 21))) for image in images] == list(range(7))
    count, durations = webp_facts(encode_webp(frames, fps=fps))
    assert count == 7
    assert all(abs(d - 1000 / fps) <= 1 for d in durations)
    assert sum(durations) == round(7 * 1000 / fps)


def test_webp_durations_do_not_drift():
    durations = webp_durations(30, 3)
    assert set(durations) == {333, 334}
    assert [sum(durations[: k + 1]) for k in range(30)] == [
        round((k + 1) * 1000 / 3) for k in range(30)
    ]


def test_bad_animation_input_is_refused():
    with pytest.raises(MediaError, match="fps must be a positive number"):
        encode_mp4([frame(0)], fps=0)
    with pytest.raises(MediaError, match="different sizes"):
        encode_webp([frame(0), frame(1, (16, 16))], fps=4)
