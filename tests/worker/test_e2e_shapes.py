"""A model shaped unlike SD 1.5 (7 self-attention blocks on two levels) served end to end by
real processes: the worker measures it and reports it, the gateway validates against it, jobs
with defaults, explicit values and no control equal the engine run here; and a worker whose
catalog entry contradicts its model refuses to start, saying so."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from masactrl_core import ControlConfig
from tests.conftest import RedisServer, S3Server, free_port
from tests.worker.helpers import ManagedProcess, python_command, wait_for
from tests.worker.test_e2e import API_KEY, STARTUP_TIMEOUT, WEBHOOK_SECRET, _download
from worker.outputs import png_bytes

pytestmark = pytest.mark.slow

STEPS = 4
# What an operator knows of a pruned checkpoint: its name, source, family and native size.
ENTRY = {"name": "small", "family": "sd", "native_width": 64, "native_height": 64}


def environment(
    redis: RedisServer,
    s3: S3Server,
    model: Path,
    log_dir: Path,
    port: int,
    entry: dict[str, Any] = ENTRY,
    **declared: Any,
) -> dict[str, str]:
    """The processes' environment, serving ``model`` as the catalog's one ``entry``."""
    import hashlib

    served = {**entry, "source": str(model), **declared}
    catalog = {"default": served["name"], "models": [served]}
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "HOME": str(log_dir),
        "HF_HUB_OFFLINE": "1",
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_REDIS_URL": redis.url,
        "MASACTRL_STORAGE_URL": f"s3://{s3.bucket}/shapes-{secrets.token_hex(4)}",
        "MASACTRL_S3_ENDPOINT_URL": s3.endpoint_url,
        "MASACTRL_S3_ACCESS_KEY_ID": s3.access_key,
        "MASACTRL_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "MASACTRL_S3_REGION": s3.region,
        "MASACTRL_URL_SIGNING_SECRET": "shapes-url-signing-secret-0123456789abcdef",
        "MASACTRL_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MASACTRL_CATALOG": json.dumps(catalog),
        "MASACTRL_API_KEYS": json.dumps(
            [
                {
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "tenant": "acme",
                    "webhook_secret": WEBHOOK_SECRET,
                }
            ]
        ),
        "MASACTRL_RATE_LIMIT_PER_SECOND": "1000",
        "MASACTRL_RATE_LIMIT_BURST": "1000",
        "MASACTRL_TORCH_THREADS": "1",
        "MASACTRL_WORKER_HEARTBEAT_TTL_SECONDS": "3",
        "MASACTRL_PROGRESS_INTERVAL_SECONDS": "0",
    }


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from masactrl_core.tiny import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("e2e-small") / "model"
    return write_tiny_checkpoint(folder, seed=0, variant="two-level")


@pytest.fixture(scope="module")
def client(
    redis_server: RedisServer,
    s3_server: S3Server,
    small_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[httpx.Client]:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    log_dir = tmp_path_factory.mktemp("e2e-shapes-logs")
    port = free_port()
    env = environment(redis_server, s3_server, small_model, log_dir, port)
    uvicorn = ["-m", "uvicorn", "--factory", "service.main:create_app", "--port", str(port)]
    gateway = ManagedProcess(
        "gateway", python_command(*uvicorn, "--log-level", "warning"), env, log_dir
    ).start()
    worker = ManagedProcess(
        "gpu-worker",
        python_command("-m", "masactrl_cli.main", "worker", "--model", "small"),
        env,
        log_dir,
    ).start()
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    try:

        def measured() -> bool:
            assert worker.alive, worker.log_tail()
            assert gateway.alive, gateway.log_tail()
            try:
                models = http.get("/v1/models").json()["data"]
            except (httpx.TransportError, ValueError, KeyError):
                return False
            return models[0]["shape_source"] == "measured"

        wait_for(measured, STARTUP_TIMEOUT, 0.3, "the worker to report its model's shape")
        yield http
    finally:
        http.close()
        worker.stop()
        gateway.stop()


@pytest.fixture(scope="module")
def engine(small_model: Path) -> Iterator[Any]:
    import torch

    from masactrl_core import MasaCtrlEngine

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MasaCtrlEngine.from_pretrained(small_model, device="cpu")
    torch.set_num_threads(before)


def run(client: httpx.Client, control: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a dog"],
        "steps": STEPS,
        "seed": 5,
    }
    if control is not None:
        body["control"] = control
    response = client.post("/v1/syntheses", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def ended() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    job = wait_for(ended, 120, 0.2, f"job {job_id}")
    assert job["status"] == "succeeded", job
    return job


def test_the_gateway_shows_and_enforces_the_measured_shape(client: httpx.Client) -> None:
    small = client.get("/v1/models").json()["data"][0]
    assert (small["block_count"], small["size_multiple"]) == (7, 4)
    assert small["default_control"] == {"start_step": 4, "start_layer": 4}
    refused = client.post(
        "/v1/syntheses",
        json={"source_prompt": "a", "target_prompts": ["b"], "control": {"start_layer": 7}},
    )
    assert refused.status_code == 422
    detail = refused.json()["error"]["details"][0]
    assert detail["loc"] == ["body", "control", "start_layer"]
    assert "less than 7" in detail["message"]


@pytest.mark.parametrize(
    "control",
    [None, {"start_step": 1, "start_layer": 3}, {"start_step": STEPS}, {"steps": []}],
    ids=["defaults", "explicit", "start-at-steps", "no-steps"],
)
def test_jobs_equal_the_engine_with_defaults_explicit_values_and_no_control(
    client: httpx.Client, engine: Any, control: dict[str, Any] | None
) -> None:
    job = run(client, control)
    resolved = job["input"]["control"]
    if control is None:
        assert (resolved["start_step"], resolved["start_layer"]) == (4, 4)
    expected = engine.synthesize(
        "a photo of a cat",
        ["a photo of a dog"],
        seed=5,
        steps=STEPS,
        control=ControlConfig(
            start_step=resolved["start_step"],
            start_layer=resolved["start_layer"],
            steps=resolved["steps"],
        ),
    )
    assert _download(job) == [png_bytes(i) for i in (expected.source, *expected.targets)]
    if control in ({"start_step": STEPS}, {"steps": []}):
        assert job["metrics"]["unet_image_evals"] == 2 * (1 + 1) * STEPS


def test_a_worker_whose_catalog_contradicts_its_model_refuses_to_start(
    redis_server: RedisServer,
    s3_server: S3Server,
    small_model: Path,
    tmp_path: Path,
) -> None:
    env = environment(redis_server, s3_server, small_model, tmp_path, free_port(), block_count=16)
    worker = ManagedProcess(
        "contradicted-worker",
        python_command("-m", "masactrl_cli.main", "worker", "--model", "small"),
        env,
        tmp_path,
    ).start()
    try:
        wait_for(lambda: not worker.alive, STARTUP_TIMEOUT, 0.3, "the worker to stop")
        log = worker.log_tail(200)
        assert "small declares block_count 16, but the model measures 7" in log
        assert worker.process is not None and worker.process.returncode != 0
    finally:
        worker.stop()
