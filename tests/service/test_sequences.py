"""POST /v1/sequences at the gateway: accepted JSON and multipart jobs, and the 422/413 limits."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from masactrl_jobs.media import encode_mp4
from service.config import GatewaySettings
from tests.images import data_url, png_bytes
from tests.service.conftest import broker_messages
from tests.videos import blank_video

CATALOG = {
    "default": "sd15",
    "models": {
        "sd15": {
            "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "family": "sd",
            "conditions": {
                "canny": {"source": "lllyasviel/sd-controlnet-canny", "kind": "controlnet"}
            },
        },
    },
}
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture()
def make(make_settings: Callable[..., GatewaySettings]) -> Callable[..., GatewaySettings]:
    return lambda **overrides: make_settings(catalog=json.dumps(CATALOG), **overrides)


@pytest.fixture()
def settings(make: Callable[..., GatewaySettings]) -> GatewaySettings:
    return make()


def _frames() -> list[bytes]:
    # Different sizes on purpose: the engine fits each frame to the output size.
    return [png_bytes(width=64 + 8 * k, color=color) for k, color in enumerate(COLORS)]


def _noise(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), random.Random(seed).randbytes(64 * 64 * 3)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _video(frames: int = 6, fps: float = 6.0) -> bytes:
    images = [Image.new("RGB", (64, 48), (40 * k, 0, 0)) for k in range(frames)]
    return encode_mp4(images, fps)


def _sequence(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source_prompt": "a photo of a dancer",
        "target_prompts": ["a photo of a dancer, moving"],
        "condition": {"model": "canny", "frames": [data_url(f) for f in _frames()]},
        "steps": 10,
        "seed": 7,
        "fps": 12,
    }
    body.update(overrides)
    return body


def _stored(settings: GatewaySettings, key: str) -> bytes:
    return (Path(settings.storage_url.removeprefix("file://")) / key).read_bytes()


def _inputs(settings: GatewaySettings) -> list[Path]:
    folder = Path(settings.storage_url.removeprefix("file://")) / "inputs"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_json_sequence_is_queued_with_its_frames_stored_in_order(
    client: TestClient, settings: GatewaySettings, redis_client: redis.Redis
) -> None:
    response = client.post("/v1/sequences", json=_sequence())
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "sequence" and job["status"] == "queued"
    condition = job["input"]["condition"]
    assert [_stored(settings, key) for key in condition["images"]] == _frames()
    assert condition["video"] is None and condition["model"] == "canny"
    assert job["input"]["animation_fps"] == 12 and job["input"]["image"] is None
    assert job["input"]["seed"] == 7 and job["input"]["steps"] == 10
    assert broker_messages(redis_client, "masactrl.sd15") == [("masactrl.run_job", [job["id"]])]


def test_an_image_source_may_be_anchored_with_one_prompt_per_frame(client: TestClient) -> None:
    body = _sequence(
        image=data_url(png_bytes(color=(9, 9, 9))),
        anchor_source=True,
        source_prompt="",
        target_prompts=["one", "two", "three"],
    )
    response = client.post("/v1/sequences", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["input"]["image"].startswith("inputs/") and job["input"]["anchor_source"] is True
    assert job["input"]["target_prompts"] == ["one", "two", "three"]


def test_multipart_frames_keep_their_part_order(
    client: TestClient, settings: GatewaySettings
) -> None:
    params = _sequence(condition={"model": "canny", "preprocess": "canny"})
    files = [("frame", (f"f{k}.png", data, "image/png")) for k, data in enumerate(_frames())]
    response = client.post("/v1/sequences", files=files, data={"params": json.dumps(params)})
    assert response.status_code == 202, response.text
    condition = response.json()["input"]["condition"]
    assert [_stored(settings, key) for key in condition["images"]] == _frames()
    assert condition["preprocess"] == "canny"


def test_a_multipart_video_is_probed_and_stored(
    client: TestClient, settings: GatewaySettings
) -> None:
    video = _video()
    params = _sequence(condition={"model": "canny", "fps": 3, "max_frames": 2})
    response = client.post(
        "/v1/sequences",
        files=[("video", ("clip.mp4", video, "video/mp4"))],
        data={"params": json.dumps(params)},
    )
    assert response.status_code == 202, response.text
    condition = response.json()["input"]["condition"]
    assert condition["images"] == [] and (condition["fps"], condition["max_frames"]) == (3, 2)
    assert _stored(settings, condition["video"]) == video


def test_a_json_video_reference_is_accepted(client: TestClient) -> None:
    body = _sequence(condition={"model": "canny", "video": data_url(_video(), "video/mp4")})
    response = client.post("/v1/sequences", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["condition"]["video"].startswith("inputs/")


def _frames_refs(count: int) -> list[str]:
    return [data_url(png_bytes())] * count


BAD = [
    ("no frames nor video", {"condition": {"model": "canny"}}, ["condition", "frames"], "needs"),
    (
        "frames and video",
        {"condition": {"model": "canny", "frames": _frames_refs(1), "video": "data:x"}},
        ["condition", "video"],
        "not both",
    ),
    (
        "fps without a video",
        {"condition": {"model": "canny", "frames": _frames_refs(1), "fps": 4}},
        ["condition", "fps"],
        "sample a video",
    ),
    (
        "too many frames",
        {"condition": {"model": "canny", "frames": _frames_refs(5)}},
        ["condition", "frames"],
        "at most 4 condition frames, got 5",
    ),
    (
        "prompts neither 1 nor frames",
        {"target_prompts": ["a", "b"]},
        ["target_prompts"],
        "one per frame (3)",
    ),
    (
        "several prompts for a video",
        {"target_prompts": ["a", "b"], "condition": {"model": "canny", "video": "data:x"}},
        ["target_prompts"],
        "give one target prompt",
    ),
    ("anchor without image", {"anchor_source": True}, ["anchor_source"], "needs an image"),
    ("no source at all", {"source_prompt": " "}, ["source_prompt"], "source_prompt"),
    (
        "unknown condition model",
        {"condition": {"model": "pose", "frames": _frames_refs(1)}},
        ["condition", "model"],
        "no condition model 'pose'",
    ),
    (
        "bad window",
        {"condition": {"model": "canny", "frames": _frames_refs(1), "start": 0.9, "end": 0.1}},
        ["condition", "end"],
        "less than end",
    ),
    (
        "masks",
        {"control": {"mask": {"mode": "auto", "source_word": "a", "target_word": "a"}}},
        ["control", "mask", "mode"],
        "not available for sequences",
    ),
    (
        "bad frame",
        {"condition": {"model": "canny", "frames": [data_url(png_bytes()), "data:;base64,AAAA"]}},
        ["condition", "frames", 1],
        "",
    ),
    (
        "unreadable video",
        {"condition": {"model": "canny", "video": data_url(b"not a video", "video/mp4")}},
        ["condition", "video"],
        "cannot be read as a video",
    ),
    (
        "video over the frame limit",
        {"condition": {"model": "canny", "video": data_url(_video(frames=6), "video/mp4")}},
        ["condition", "video"],
        "gives more than 4 frames",  # the counting stops one past the limit
    ),
]


@pytest.mark.parametrize(("case", "patch", "loc", "message"), BAD, ids=[case[0] for case in BAD])
def test_bad_sequences_are_422_with_the_field_and_store_nothing(
    make: Callable[..., GatewaySettings],
    make_client: Callable[..., TestClient],
    redis_client: redis.Redis,
    case: str,
    patch: dict[str, Any],
    loc: list[Any],
    message: str,
) -> None:
    settings = make(max_sequence_frames=4)
    response = make_client(settings).post("/v1/sequences", json=_sequence(**patch))
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert details[0]["loc"] == ["body", *loc], details
    assert message in details[0]["message"], details
    assert broker_messages(redis_client, "masactrl.sd15") == []
    assert _inputs(settings) == []


def test_frames_over_the_total_byte_limit_are_413_with_the_field(
    make: Callable[..., GatewaySettings], make_client: Callable[..., TestClient]
) -> None:
    # Noise does not compress: each frame is about 12 KB, and the third crosses the limit.
    frames = [_noise(seed) for seed in range(3)]
    settings = make(max_sequence_bytes=len(frames[0]) + len(frames[1]) + 1)
    condition = {"model": "canny", "frames": [data_url(frame) for frame in frames]}
    response = make_client(settings).post("/v1/sequences", json=_sequence(condition=condition))
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert error["details"][0]["loc"] == ["body", "condition", "frames"]
    assert _inputs(settings) == []


def test_a_video_longer_than_allowed_is_413(
    make: Callable[..., GatewaySettings], make_client: Callable[..., TestClient]
) -> None:
    settings = make(max_video_seconds=0.5)
    video = _video(frames=6, fps=6.0)  # one second
    params = _sequence(condition={"model": "canny"})
    response = make_client(settings).post(
        "/v1/sequences",
        files=[("video", ("clip.mp4", video, "video/mp4"))],
        data={"params": json.dumps(params)},
    )
    assert response.status_code == 413, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == ["body", "condition", "video"]
    assert detail["type"] == "video_too_long" and "the limit is 0.5 s" in detail["message"]
    assert _inputs(settings) == []


# Decompression bombs (tests/videos.py): a few kilobytes each, refused at submission by the
# gateway's default limits (4096 px a side, 120 frames, 128 Mi pixels together), with the field.
BOMBS = [
    (
        "2 frames of 8192×8192 in MP4",
        lambda: blank_video(8192, 8192, 2),
        {},
        ["condition", "video"],
        "video_too_large",
        "the video's frames are 8192×8192 pixels; the limit is 4096×4096",
    ),
    (
        "a raw .h264 of 300 frames",
        lambda: blank_video(64, 64, 300, "h264"),
        {},
        ["condition", "video"],
        "too_many_frames",
        "the video gives more than 120 frames at this sampling",
    ),
    (
        "a raw .h264 of 300 frames at a rate it has no timestamps for",
        lambda: blank_video(64, 64, 300, "h264"),
        {"fps": 1},
        ["condition", "video"],
        "too_many_frames",
        "the video gives more than 120 frames at this sampling",
    ),
    (
        "24 frames of 4096×4096 in a raw .h264",
        lambda: blank_video(4096, 4096, 24, "h264"),
        {"max_frames": 24},
        ["condition", "video"],
        "video_too_large",
        "24 frames of 4096×4096 are 402,653,184 pixels decoded; the limit is 134,217,728",
    ),
    (
        "max_frames 1000",
        lambda: blank_video(4096, 4096, 24, "h264"),
        {"max_frames": 1000},
        ["condition", "max_frames"],
        "value_error",
        "max_frames is 1000; a sequence takes at most 120 frames",
    ),
]


@pytest.mark.parametrize("multipart", [False, True], ids=["json", "multipart"])
@pytest.mark.parametrize(
    ("case", "video", "sampling", "loc", "type", "message"), BOMBS, ids=[b[0] for b in BOMBS]
)
def test_video_bombs_are_refused_at_submission_with_the_field_and_nothing_enqueued(
    make: Callable[..., GatewaySettings],
    make_client: Callable[..., TestClient],
    redis_client: redis.Redis,
    case: str,
    video: Callable[[], bytes],
    sampling: dict[str, Any],
    loc: list[str],
    type: str,
    message: str,
    multipart: bool,
) -> None:
    settings = make()
    client = make_client(settings)
    data = video()
    assert len(data) < 256 * 1024  # small on the wire: the limits are not about bytes
    if multipart:
        params = _sequence(condition={"model": "canny", **sampling})
        response = client.post(
            "/v1/sequences",
            files=[("video", ("clip.h264", data, "application/octet-stream"))],
            data={"params": json.dumps(params)},
        )
    else:
        condition = {"model": "canny", "video": data_url(data, "video/mp4"), **sampling}
        response = client.post("/v1/sequences", json=_sequence(condition=condition))
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == ["body", *loc], detail
    assert message in detail["message"], detail
    assert detail["type"] == type, detail
    assert broker_messages(redis_client, "masactrl.sd15") == []
    assert _inputs(settings) == []


def test_a_multipart_part_the_route_does_not_know_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/sequences",
        files=[("frames", ("a.png", png_bytes(), "image/png"))],
        data={"params": json.dumps(_sequence())},
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "frames"]


def test_an_idempotent_replay_returns_the_same_sequence(client: TestClient) -> None:
    headers = {"Idempotency-Key": "seq-1"}
    first = client.post("/v1/sequences", json=_sequence(), headers=headers)
    again = client.post("/v1/sequences", json=_sequence(), headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
