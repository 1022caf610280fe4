"""The tiny FLUX model served end to end by real processes (gateway, GPU worker on the CPU, Redis,
moto S3), started once for this module: the worker measures the model and its family's default
control and reports them, `GET /v1/models` says what the family lacks, a synthesis equals the
engine run here, an edit costs S + 2S transformer images, and the playground (in chromium) shows
synthesis and edit and disables sequences, layout conditions and the negative prompt, saying why.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, expect

from masactrl_core import ControlConfig
from tests.conftest import RedisServer, S3Server, free_port
from tests.service.test_playground_browser import browser, wait_until_done  # noqa: F401
from tests.worker.helpers import ManagedProcess, python_command, wait_for
from tests.worker.test_e2e import API_KEY, STARTUP_TIMEOUT, _download
from tests.worker.test_e2e_shapes import environment
from worker.outputs import png_bytes

pytestmark = pytest.mark.slow

STEPS = 3
SIDE = 64
ENTRY = {"name": "flux", "family": "flux"}


@pytest.fixture(scope="module")
def client(
    redis_server: RedisServer,
    s3_server: S3Server,
    tiny_flux_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[httpx.Client]:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    log_dir = tmp_path_factory.mktemp("e2e-flux-logs")
    port = free_port()
    env = environment(redis_server, s3_server, tiny_flux_checkpoint, log_dir, port, ENTRY)
    uvicorn = ["-m", "uvicorn", "--factory", "service.main:create_app", "--port", str(port)]
    gateway = ManagedProcess(
        "gateway", python_command(*uvicorn, "--log-level", "warning"), env, log_dir
    ).start()
    worker = ManagedProcess(
        "gpu-worker",
        python_command("-m", "masactrl_cli.main", "worker", "--model", "flux"),
        env,
        log_dir,
    ).start()
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    try:

        def measured() -> bool:
            assert worker.alive, worker.log_tail()
            assert gateway.alive, gateway.log_tail()
            try:
                models = http.get("/v1/models").json()["data"]
            except (httpx.TransportError, ValueError, KeyError):
                return False
            return bool(models[0]["shape_source"] == "measured" and models[0]["live"])

        wait_for(measured, STARTUP_TIMEOUT, 0.3, "the FLUX worker to report its model's shape")
        yield http
    finally:
        http.close()
        worker.stop()
        gateway.stop()


@pytest.fixture(scope="module")
def engine(tiny_flux_checkpoint: Path) -> Iterator[Any]:
    import torch

    from masactrl_core import MasaCtrlEngine

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MasaCtrlEngine.from_pretrained(tiny_flux_checkpoint, device="cpu")
    torch.set_num_threads(before)


def _finished(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def ended() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    job: dict[str, Any] = wait_for(ended, 120, 0.2, f"job {job_id}")
    assert job["status"] == "succeeded", job
    return job


def test_the_gateway_shows_the_measured_flux_model_and_what_it_lacks(
    client: httpx.Client,
) -> None:
    [flux] = client.get("/v1/models").json()["data"]
    assert (flux["family"], flux["prediction_type"]) == ("flux", "flow")
    assert (flux["block_count"], flux["native_width"]) == (4, 256)
    # The engine's FLUX default, reported by the worker: the first single-stream block.
    assert flux["default_control"] == {"start_step": 4, "start_layer": 2}
    assert flux["features"]["layout_conditions"] is False
    assert flux["features"]["sequences"] is False
    assert flux["features"]["negative_prompt"] is False
    refused = client.post(
        "/v1/syntheses",
        json={"source_prompt": "a", "target_prompts": ["b"], "negative_prompt": "blurry"},
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["loc"] == ["body", "negative_prompt"]


def test_a_synthesis_equals_the_engine(client: httpx.Client, engine: Any) -> None:
    body = {
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a dog", "a red car"],
        "steps": STEPS,
        "seed": 5,
        "guidance_scale": 3.5,
        "width": SIDE,
        "height": SIDE,
        "control": {"start_step": 0},
    }
    job = _finished(client, client.post("/v1/syntheses", json=body))
    control = job["input"]["control"]
    assert control["start_layer"] == 2
    expected = engine.synthesize(
        body["source_prompt"],
        body["target_prompts"],
        seed=5,
        steps=STEPS,
        guidance_scale=3.5,
        width=SIDE,
        height=SIDE,
        control=ControlConfig(
            start_step=control["start_step"],
            start_layer=control["start_layer"],
            steps=control["steps"],
        ),
    )
    assert _download(job) == [png_bytes(i) for i in (expected.source, *expected.targets)]
    # Guidance-distilled: one row per image and step.
    assert job["metrics"]["unet_image_evals"] == STEPS * 3


def test_a_single_target_edit_costs_s_plus_2s(client: httpx.Client) -> None:
    photo = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (200, 40, 40)).save(photo, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(photo.getvalue()).decode()
    body = {
        "image": data,
        "source_prompt": "a red square",
        "target_prompts": ["a red circle"],
        "steps": STEPS,
        "seed": 2,
        "guidance_scale": 3.5,
    }
    job = _finished(client, client.post("/v1/edits", json=body))
    assert job["metrics"]["unet_image_evals"] == STEPS + 2 * STEPS
    assert len(job["output"]["images"]) == 2


@pytest.mark.browser
def test_the_playground_offers_synthesis_and_edit_and_says_why_not_the_rest(
    client: httpx.Client,
    browser: Browser,  # noqa: F811
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    try:
        page.goto(f"{client.base_url}/playground")
        page.get_by_test_id("api-key").fill(API_KEY)
        page.get_by_test_id("api-key").press("Tab")
        expect(page.locator("#model option[value=flux]")).to_have_count(1)
        expect(page.locator("#mode option[value=sequence]")).to_be_disabled()
        expect(page.locator("#mode option[value=edit]")).to_be_enabled()
        expect(page.get_by_test_id("mode-unavailable")).to_contain_text(
            "Sequences are off: flux is a flux model, and layout conditions and sequences are "
            "not available on FLUX.1 models yet"
        )
        expect(page.get_by_test_id("condition-model")).to_be_disabled()
        expect(page.get_by_test_id("condition-unavailable")).to_contain_text(
            "Layout conditions are off"
        )
        expect(page.locator("#mask-mode option[value=auto]")).to_be_disabled()
        expect(page.get_by_test_id("mask-auto-unavailable")).to_contain_text("draw the regions")
        expect(page.get_by_test_id("negative-prompt")).to_be_disabled()
        expect(page.get_by_test_id("negative-prompt-unavailable")).to_contain_text(
            "guidance-distilled"
        )
        # A synthesis through the page, end to end.
        page.get_by_test_id("source-prompt").fill("a photo of a cat")
        page.get_by_test_id("target-prompt").first.fill("a photo of a dog")
        page.get_by_test_id("steps").fill(str(STEPS))
        page.get_by_test_id("guidance").fill("3.5")
        page.get_by_test_id("submit").click()
        wait_until_done(page)
        expect(page.get_by_test_id("result-image")).to_have_count(2)
    finally:
        context.close()
    assert errors == []
