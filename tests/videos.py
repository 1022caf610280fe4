"""Videos built in the tests with PyAV, decompression bombs among them.

A blank frame costs x264 almost nothing, so a few kilobytes can declare frames of any size: the
bombs the media checks must refuse are made here (never stored as fixtures), and each test says
what it built. ``h264`` writes a raw Annex B stream: no container, so no duration, no frame
count and no timestamps, which is exactly what a check that trusts metadata misses.
"""

from __future__ import annotations

import functools
import io
from fractions import Fraction
from typing import Literal

import av

__all__ = ["blank_video"]


@functools.cache
def blank_video(
    width: int, height: int, count: int, container: Literal["mp4", "h264"] = "mp4"
) -> bytes:
    """``count`` blank frames of ``width``×``height`` in H.264, at 24 frames a second."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream("libx264", rate=24)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for index in range(count):
            frame.pts = index
            frame.time_base = Fraction(1, 24)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return buffer.getvalue()
