"""The input byte budgets (service/budget.py) through the gateway: one per request, one for the
process, a reference named twice read once, and nothing held after the request."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from masactrl_jobs.media import encode_mp4
from service.config import GatewaySettings
from tests.images import data_url
from tests.service.conftest import ImageServer

KiB = 1024
# The default catalog's sd15 with a condition model, so that condition images are inputs too.
CATALOG = json.dumps(
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
)


def noise_png(side: int) -> bytes:
    """An incompressible PNG: its file is about side² × 3 bytes."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def amplified_edit(image: str, masks: list[str], conditions: list[str]) -> dict[str, Any]:
    """An edit whose photo, mask pairs and condition images are the given references."""
    targets = max(1, len(conditions))
    body: dict[str, Any] = {
        "image": image,
        "source_prompt": "a photo of a cat",
        "target_prompts": [f"a photo of a cat, take {k}" for k in range(targets)],
    }
    if masks:
        regions = [{"source": masks[i], "target": masks[i + 1]} for i in range(0, len(masks), 2)]
        body["control"] = {"mask": {"mode": "manual", "regions": regions}}
    if conditions:
        body["condition"] = {"model": "canny", "images": conditions}
    return body


def error_of(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def stored_inputs(settings: GatewaySettings) -> list[Path]:
    root = Path(settings.storage_url.removeprefix("file://")) / "inputs"
    return sorted(root.glob("*")) if root.exists() else []


def held(client: TestClient) -> int:
    """The bytes the gateway process holds for requests in flight."""
    held_now: int = client.app.state.gateway.intake.inflight.held  # type: ignore[attr-defined]
    return held_now


@pytest.fixture()
def budget_settings(
    make_settings: Callable[..., GatewaySettings],
) -> Callable[..., GatewaySettings]:
    def make(**overrides: Any) -> GatewaySettings:
        return make_settings(catalog=CATALOG, allow_loopback_http=True, **overrides)

    return make


def test_the_same_url_named_25_times_is_fetched_once_and_charged_once(
    budget_settings: Callable[..., GatewaySettings], make_client, image_server: ImageServer
) -> None:
    big = noise_png(160)  # about 75 KiB
    image_server.routes["/big.png"] = (200, {}, big)
    url = image_server.url("/big.png")
    # Spelled differently but the same resource for the server: one fetch.
    same = url.replace("http://127.0.0.1", "HTTP://127.0.0.1") + "#frag"
    # 25 references of 75 KiB are 1.8 MiB: over this budget unless they are charged once.
    settings = budget_settings(max_request_input_bytes=len(big) + KiB)
    client = make_client(settings)
    response = client.post("/v1/edits", json=amplified_edit(url, [url, same] * 8, [url] * 8))
    assert response.status_code == 202, response.text
    assert image_server.hits == ["/big.png"]
    job_input = response.json()["input"]
    assert job_input["condition"]["images"] == [job_input["image"]] * 8
    assert len(stored_inputs(settings)) == 1
    assert held(client) == 0


def test_inputs_past_the_request_budget_are_refused_with_413_naming_the_field(
    budget_settings: Callable[..., GatewaySettings], make_client, image_server: ImageServer
) -> None:
    pngs = [noise_png(100 + k) for k in range(4)]  # distinct, about 30 KiB each
    for k, png in enumerate(pngs):
        image_server.routes[f"/{k}.png"] = (200, {}, png)
    urls = [image_server.url(f"/{k}.png") for k in range(4)]
    # Room for the photo and the first mask, not for the second one.
    settings = budget_settings(max_request_input_bytes=len(pngs[0]) + len(pngs[1]) + KiB)
    client = make_client(settings)
    response = client.post("/v1/edits", json=amplified_edit(urls[0], urls[1:3], []))
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error["code"] == "payload_too_large"
    assert "control.mask.regions.0.target" in error["message"]
    assert error["message"].endswith("in all.")
    assert error["details"][0]["loc"] == ["body", "control", "mask", "regions", 0, "target"]
    assert error["details"][0]["type"] == "request_inputs_too_large"
    # The download that crossed the budget stopped there; nothing was stored or is held.
    assert stored_inputs(settings) == []
    assert held(client) == 0


def test_uploads_and_data_urls_count_against_the_same_budget(
    budget_settings: Callable[..., GatewaySettings], make_client
) -> None:
    photo, condition = noise_png(100), noise_png(101)
    settings = budget_settings(max_request_input_bytes=len(photo) + len(condition) - 1)
    client = make_client(settings)
    # A data: URL photo and a data: URL condition image.
    body = amplified_edit(data_url(photo), [], [data_url(condition)])
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 413, response.text
    assert error_of(response)["details"][0]["loc"] == ["body", "condition", "images", 0]
    # The same as multipart file parts.
    params = {k: v for k, v in body.items() if k != "image"}
    params["condition"] = {"model": "canny"}
    response = client.post(
        "/v1/edits",
        files=[
            ("image", ("photo.png", photo, "image/png")),
            ("condition_image", ("c.png", condition, "image/png")),
        ],
        data={"params": json.dumps(params)},
    )
    assert response.status_code == 413, response.text
    assert error_of(response)["details"][0]["loc"] == ["body", "condition_image", 0]
    assert held(client) == 0


def test_inputs_past_the_process_budget_are_refused_with_503_and_retry_after(
    budget_settings: Callable[..., GatewaySettings], make_client
) -> None:
    photo = noise_png(40)  # about 5 KiB
    settings = budget_settings(max_inflight_input_bytes=len(photo) - 1)
    client = make_client(settings)
    response = client.post("/v1/edits", json=amplified_edit(data_url(photo), [], []))
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "inputs_busy"
    assert response.headers["Retry-After"] == "5"
    assert error_of(response)["details"][0]["loc"] == ["body", "image"]
    # With room, the same request passes, and gives its bytes back when it ends.
    roomy = make_client(budget_settings(max_inflight_input_bytes=len(photo)))
    assert roomy.post("/v1/edits", json=amplified_edit(data_url(photo), [], [])).status_code == 202
    assert held(roomy) == 0


def small_video() -> bytes:
    frames = [Image.new("RGB", (64, 64), (40 * k, 80, 120)) for k in range(4)]
    return encode_mp4(frames, 8.0)


SEQUENCE = {
    "source_prompt": "a photo of a cat",
    "target_prompts": ["a photo of a dog"],
    "condition": {"model": "canny"},
}


def test_a_video_url_is_fetched_into_a_file_probed_and_stored_whole(
    budget_settings: Callable[..., GatewaySettings], make_client, image_server: ImageServer
) -> None:
    video = small_video()
    image_server.routes["/clip.mp4"] = (200, {}, video)
    settings = budget_settings()
    client = make_client(settings)
    body = {**SEQUENCE, "condition": {"model": "canny", "video": image_server.url("/clip.mp4")}}
    response = client.post("/v1/sequences", json=body)
    assert response.status_code == 202, response.text
    key = response.json()["input"]["condition"]["video"]
    assert key == f"inputs/{hashlib.sha256(video).hexdigest()}.video"
    root = Path(settings.storage_url.removeprefix("file://"))
    assert (root / key).read_bytes() == video
    assert held(client) == 0


def test_a_video_upload_past_the_request_budget_is_413_naming_it(
    budget_settings: Callable[..., GatewaySettings], make_client
) -> None:
    video = small_video()
    settings = budget_settings(max_request_input_bytes=len(video) - 1)
    client = make_client(settings)
    response = client.post(
        "/v1/sequences",
        files=[("video", ("clip.mp4", video, "video/mp4"))],
        data={"params": json.dumps(SEQUENCE)},
    )
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error["details"][0]["loc"] == ["body", "condition", "video"]
    assert "condition.video" in error["message"]
    assert stored_inputs(settings) == []
    assert held(client) == 0


def test_fetches_across_requests_wait_for_one_of_the_process_s_slots(
    budget_settings: Callable[..., GatewaySettings],
) -> None:
    import asyncio
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from masactrl_jobs.storage import storage_from_settings
    from service.intake import ImageIntake

    png = noise_png(40)
    lock = threading.Lock()
    active, most = 0, 0

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            nonlocal active, most
            with lock:
                active += 1
                most = max(most, active)
            time.sleep(0.2)
            with lock:
                active -= 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = budget_settings(max_concurrent_fetches=2)
        intake = ImageIntake(settings, storage_from_settings(settings))
        port = server.server_address[1]

        async def one_request(k: int) -> None:
            async with intake.request() as request:
                await request.read(f"http://127.0.0.1:{port}/{k}.png", ("body", "image"))

        async def five_requests() -> None:
            await asyncio.gather(*(one_request(k) for k in range(5)))

        asyncio.run(five_requests())
    finally:
        server.shutdown()
        server.server_close()
    assert most == 2  # five requests fetching at once, two downloads at a time
    assert intake.inflight.held == 0
