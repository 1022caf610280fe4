"""A real gateway process (uvicorn, real Redis, moto's S3) under the input loads of issue 20:
how much its resident memory grows.

What it measures: the gateway's RSS, sampled every 20 ms in a thread, before and at the peak of

- 8 concurrent 40 MB multipart edits (a 20 MB PNG photo and the same PNG as a condition image:
  valid inputs the gateway decodes, validates and stores, not padding it refuses unread);
- 8 concurrent multipart sequences, each a 40 MB ``video`` part (a real 4-frame H.264 MP4 with a
  40 MB ``free`` box, which demuxers skip: it probes as a 0.5 s video and is stored whole);
- 4 concurrent JSON edits of about 2 KB whose photo, 16 masks and 8 condition images all name
  one 20 MB PNG served on loopback (the amplification the attack run used);

and, for the sequences, what stays once the uploads are over. Each scenario must stay under
150 MiB of growth or be refused (413 past the request budget, 503 for want of room); at least one
request of each must be accepted, or nothing was measured. A sequence's video is never held in
memory, so its scenario must grow by less than one video. Measured on the code before the
budgets (2-core development machine): the URL edits grew the gateway by 1,610 MiB, the
sequences by 82 MiB, the edit uploads by 133 MiB; after: 54, 0 and 59 MiB.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from masactrl_jobs.media import encode_mp4
from tests.conftest import RedisServer, S3Server, free_port
from tests.service.conftest import SIGNING_SECRET, ImageServer, bearer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEY = "memory-test-key-5a6b7c"
MiB = 1024 * 1024
GROWTH_LIMIT = 150 * MiB
CATALOG = {
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


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    home: Path  # also its TMPDIR

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def temporary_files(self) -> list[str]:
        """Files the gateway holds open or left behind in its TMPDIR (its log aside)."""
        opened = [f.path for f in psutil.Process(self.process.pid).open_files()]
        left = [str(p) for p in self.home.iterdir() if p != self.log]
        return sorted(
            p for p in [*opened, *left] if p.startswith(str(self.home)) and p != str(self.log)
        )


@pytest.fixture(scope="module")
def gateway(
    redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("gateway-memory")
    port = free_port()
    log = home / "gateway.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home),  # the spooled inputs land here, and go with the folder
        "PYTHONPATH": str(REPO),
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_ALLOW_LOOPBACK_HTTP": "true",  # the big PNG is served on loopback
        "MASACTRL_DEV_API_KEY": KEY,
        "MASACTRL_REDIS_URL": redis_server.url,
        "MASACTRL_STORAGE_URL": f"s3://{s3_server.bucket}/memory",
        "MASACTRL_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "MASACTRL_S3_ACCESS_KEY_ID": s3_server.access_key,
        "MASACTRL_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "MASACTRL_S3_REGION": s3_server.region,
        "MASACTRL_URL_SIGNING_SECRET": SIGNING_SECRET,
        "MASACTRL_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
        "MASACTRL_RATE_LIMIT_PER_SECOND": "1000",
        "MASACTRL_RATE_LIMIT_BURST": "1000",
        "MASACTRL_CATALOG": json.dumps(CATALOG),
        # Every upload gets its turn: the test measures the uploads, not their refusal.
        "MASACTRL_LARGE_UPLOAD_WAIT_SECONDS": "120",
    }
    command = [sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
        yield Gateway(url, process, log, home)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 20 MB PNG (2600×2600, stored uncompressed: cheap to make, a full decode to check)."""
    buffer = io.BytesIO()
    Image.new("RGB", (2600, 2600), (90, 120, 150)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def padded_video(total: int) -> bytes:
    """A real 4-frame MP4 grown to ``total`` bytes by a top-level ``free`` box."""
    frames = [Image.new("RGB", (64, 64), (40 * k, 80, 120)) for k in range(4)]
    video = encode_mp4(frames, 8.0)
    pad = total - len(video)
    return video + struct.pack(">I", pad) + b"free" + bytes(pad - 8)


@pytest.fixture(scope="module")
def png_server(big_png: bytes) -> Iterator[ImageServer]:
    server = ImageServer()
    server.routes["/big.png"] = (200, {"Content-Type": "image/png"}, big_png)
    yield server
    server.close()


@dataclass
class Measured:
    baseline: int
    peak: int
    after: int
    statuses: list[int]

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def describe(self) -> str:
        return (
            f"grew by {self.growth / MiB:.0f} MiB at the peak, "
            f"{(self.after - self.baseline) / MiB:+.0f} MiB a second after; "
            f"statuses {sorted(self.statuses)}"
        )


def measure(gateway: Gateway, send: Callable[[], int], count: int) -> Measured:
    """RSS before, at the peak of ``count`` concurrent ``send()`` calls, and a second after."""
    baseline = gateway.rss()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, gateway.rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(count) as pool:
            statuses = list(pool.map(lambda _: send(), range(count)))
    finally:
        done.set()
        sampler.join()
    time.sleep(1.0)
    return Measured(baseline, peak, gateway.rss(), statuses)


def post(gateway: Gateway, **kwargs: Any) -> int:
    response = httpx.post(f"{gateway.url}{kwargs.pop('path')}", timeout=180, **kwargs)
    assert response.status_code in (202, 413, 503), response.text
    return response.status_code


def edit_upload(gateway: Gateway, png: bytes) -> int:
    params = {
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a dog"],
        "condition": {"model": "canny"},
    }
    return post(
        gateway,
        path="/v1/edits",
        headers=bearer(KEY),
        files=[
            ("image", ("photo.png", png, "image/png")),
            ("condition_image", ("layout.png", png, "image/png")),
        ],
        data={"params": json.dumps(params)},
    )


def sequence_upload(gateway: Gateway, video: bytes) -> int:
    params = {
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a dog"],
        "condition": {"model": "canny"},
    }
    return post(
        gateway,
        path="/v1/sequences",
        headers=bearer(KEY),
        files=[("video", ("clip.mp4", video, "video/mp4"))],
        data={"params": json.dumps(params)},
    )


def amplified_edit(gateway: Gateway, url: str) -> int:
    """About 2 KB of JSON naming ``url`` 25 times: the photo, 16 masks, 8 condition images."""
    body = {
        "image": url,
        "source_prompt": "a photo of a cat",
        "target_prompts": [f"a photo of a dog, take {k}" for k in range(8)],
        "control": {"mask": {"mode": "manual", "regions": [{"source": url, "target": url}] * 8}},
        "condition": {"model": "canny", "images": [url] * 8},
    }
    return post(gateway, path="/v1/edits", headers=bearer(KEY), json=body)


def warm_up(gateway: Gateway, send: Callable[[], int]) -> None:
    """One request first, so that code loaded on first use does not count as growth."""
    assert send() == 202


def check(measured: Measured) -> None:
    assert 202 in measured.statuses, measured.describe()  # else nothing was measured
    assert measured.growth < GROWTH_LIMIT, measured.describe()


def test_concurrent_40_mb_edit_uploads(gateway: Gateway, big_png: bytes) -> None:
    assert 2 * len(big_png) > 40 * 1000 * 1000
    small = io.BytesIO()
    Image.new("RGB", (64, 64)).save(small, format="PNG")
    warm_up(gateway, lambda: edit_upload(gateway, small.getvalue()))
    measured = measure(gateway, lambda: edit_upload(gateway, big_png), 8)
    print(f"edits: {measured.describe()}")
    check(measured)
    assert gateway.temporary_files() == []


def test_concurrent_40_mb_sequence_video_uploads_keep_nothing(gateway: Gateway) -> None:
    video = padded_video(40 * MiB)
    warm_up(gateway, lambda: sequence_upload(gateway, padded_video(MiB)))
    measured = measure(gateway, lambda: sequence_upload(gateway, video), 8)
    print(f"sequences: {measured.describe()}")
    check(measured)
    # Streamed from the spooled part to a file and to storage: not even one video in memory.
    assert measured.growth < len(video), measured.describe()
    # Once the uploads are over nothing of them stays: no memory, no open or left-over file.
    assert measured.after - measured.baseline < 60 * MiB, measured.describe()
    assert gateway.temporary_files() == []


def test_concurrent_url_amplified_edits(gateway: Gateway, png_server: ImageServer) -> None:
    url = png_server.url("/big.png")
    warm_up(gateway, lambda: amplified_edit(gateway, url))
    hits = len(png_server.hits)
    measured = measure(gateway, lambda: amplified_edit(gateway, url), 4)
    print(f"URL edits: {measured.describe()}")
    check(measured)
    # One fetch per request, not 25.
    assert len(png_server.hits) - hits == 4
    assert gateway.temporary_files() == []
