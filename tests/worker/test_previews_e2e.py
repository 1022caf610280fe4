"""Live previews end to end: a real gateway (uvicorn), a real GPU worker (Celery) and redis-server,
with ``file://`` storage served through the gateway's signed ``/v1/files`` URLs.

The catalog names the tiny preview autoencoder; the worker previews every 2 steps with no rate
limit and sleeps a little every step, so the test can fetch each preview while the job runs
(previews are deleted once the job has succeeded).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RedisServer, free_port
from tests.worker.helpers import REPO_ROOT, ManagedProcess, python_command, tiny_catalog, wait_for

pytestmark = pytest.mark.slow

API_KEY = "previews-test-key-" + "51c0ffee"
STARTUP_TIMEOUT = 120.0
STEPS = 8


@dataclass
class PreviewStack:
    client: httpx.Client
    gateway: ManagedProcess
    worker: ManagedProcess
    storage: Path

    def events(self, job_id: str, on_preview: Any = None) -> list[tuple[str, dict[str, Any]]]:
        """The job's SSE events until the stream ends; ``on_preview(data)`` runs as each
        preview arrives (its images exist only while the job runs)."""
        events = []
        name = None
        with self.client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: ") and name is not None:
                    data = json.loads(line.removeprefix("data: "))
                    events.append((name, data))
                    if name == "preview" and on_preview is not None:
                        on_preview(data)
        return events


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer,
    tiny_checkpoint: Path,
    tiny_preview_vae: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PreviewStack]:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    log_dir = tmp_path_factory.mktemp("previews-e2e")
    storage = log_dir / "storage"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(log_dir),
        "HF_HUB_OFFLINE": "1",
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_REDIS_URL": redis_server.url,
        "MASACTRL_STORAGE_URL": storage.as_uri(),
        "MASACTRL_URL_SIGNING_SECRET": "previews-url-signing-secret-0123456789ab",
        "MASACTRL_PUBLIC_BASE_URL": base_url,
        "MASACTRL_CATALOG": tiny_catalog(tiny_checkpoint, preview_vae=str(tiny_preview_vae)),
        "MASACTRL_API_KEYS": json.dumps(
            [
                {
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "tenant": "acme",
                    "webhook_secret": "whsec_cHJldmlld3MgdGVzdCBzZWNyZXQ=",
                }
            ]
        ),
        "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
        "MASACTRL_TORCH_THREADS": "1",
        "MASACTRL_WARMUP": "false",
        "MASACTRL_STEP_DELAY_SECONDS": "0.25",
        "MASACTRL_PREVIEW_EVERY_STEPS": "2",
        "MASACTRL_PREVIEW_MIN_INTERVAL_SECONDS": "0",
        "MASACTRL_PROGRESS_INTERVAL_SECONDS": "0",
    }
    gateway = ManagedProcess(
        "gateway",
        python_command(
            "-m",
            "uvicorn",
            "--factory",
            "service.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ),
        env,
        log_dir,
    ).start()
    worker = ManagedProcess(
        "gpu-worker",
        python_command("-m", "masactrl_cli.main", "worker", "--model", "tiny"),
        env,
        log_dir,
    ).start()
    client = httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )
    try:

        def ready() -> bool:
            assert gateway.alive, gateway.log_tail()
            assert worker.alive, worker.log_tail()
            try:
                models = client.get("/v1/models").json()["data"]
            except (httpx.TransportError, KeyError, ValueError):
                return False
            return models[0]["live"]

        wait_for(ready, STARTUP_TIMEOUT, 0.25, "the gateway and a live worker")
        yield PreviewStack(client, gateway, worker, storage)
    finally:
        client.close()
        worker.stop()
        gateway.stop()


def _submit(stack: PreviewStack, **extra: Any) -> str:
    body = {
        "source_prompt": "a cat sitting",
        "target_prompts": ["a cat running", "a dog sitting"],
        "steps": STEPS,
        "seed": 5,
        "control": {"start_step": 1},
        **extra,
    }
    response = stack.client.post("/v1/syntheses", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_models_say_which_decoder_previews_and_their_block_ranges(stack: PreviewStack) -> None:
    (tiny,) = stack.client.get("/v1/models").json()["data"]
    assert tiny["live"] is True
    assert tiny["preview_decoder"] == "tiny_autoencoder"
    assert tiny["block_count"] == 16
    assert tiny["default_control"] == {"start_step": 4, "start_layer": 10}


def test_a_synthesis_with_previews_streams_preview_events_whose_urls_load_images(
    stack: PreviewStack,
) -> None:
    job_id = _submit(stack, previews=True)
    fetched: list[tuple[int, list[tuple[str, int, Image.Image]]]] = []
    seen_in_job: list[dict[str, Any]] = []

    def fetch(data: dict[str, Any]) -> None:
        images = []
        for image in data["images"]:
            # No Authorization header: the signed URL is the credential, as for an <img src>.
            response = httpx.get(image["url"], timeout=10)
            assert response.status_code == 200, (image, response.text)
            assert response.headers["content-type"] == "image/webp"
            decoded = Image.open(io.BytesIO(response.content))
            decoded.load()
            images.append((image["role"], image["index"], decoded))
        fetched.append((data["step"], images))
        job = stack.client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["preview"] is not None:
            seen_in_job.append(job["preview"])

    events = stack.events(job_id, on_preview=fetch)
    names = [name for name, _ in events]
    assert names[-1] == "succeeded", stack.worker.log_tail()
    previews = [data for name, data in events if name == "preview"]
    # Every 2 steps, never at the last one (the results follow it). The model's own VAE would
    # preview every 10 steps (the default), so these come from the catalog's tiny autoencoder.
    assert [p["step"] for p in previews] == [2, 4, 6]
    assert all(p["job_id"] == job_id and p["steps"] == STEPS for p in previews)
    for step, images in fetched:
        assert [(role, index) for role, index, _ in images] == [
            ("source", 0),
            ("target", 0),
            ("target", 1),
        ], step
        assert all(image.size == (64, 64) and image.format == "WEBP" for *_, image in images)
    # A preview comes between the progress events of its step and of the next.
    first = names.index("preview")
    assert "progress" in names[:first] and "progress" in names[first + 1 :]
    # The job object shows the latest preview while it runs, in the same shape.
    assert seen_in_job and {image["role"] for image in seen_in_job[-1]["images"]} == {
        "source",
        "target",
    }
    done = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert done["input"]["previews"] is True
    assert done["preview"] is None
    # The results replace the previews: the worker deletes them once the job has succeeded.
    previews_dir = stack.storage / "results" / job_id / "previews"
    wait_for(lambda: not previews_dir.exists(), 10, 0.05, "the previews to be deleted")
    assert len(done["output"]["images"]) == 3


def test_a_job_without_previews_streams_none(stack: PreviewStack) -> None:
    job_id = _submit(stack)
    events = stack.events(job_id)
    names = [name for name, _ in events]
    assert names[-1] == "succeeded", stack.worker.log_tail()
    assert "progress" in names and "preview" not in names
    job = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert job["input"]["previews"] is False and job["preview"] is None
    assert not (stack.storage / "results" / job_id / "previews").exists()
