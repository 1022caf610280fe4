"""End to end with real processes: gateway (uvicorn), a GPU worker and the webhook worker (Celery),
redis-server, moto's S3 server and a loopback webhook receiver.

Jobs run on the tiny checkpoint with a few steps; the worker sleeps a little every step
(``MASACTRL_STEP_DELAY_SECONDS``) so that a job can be caught while it runs. Recovery times are
shrunk through settings (a dead worker's job is re-enqueued within ~3 s). The tests that stop
processes or Redis come last in the module.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook

from masactrl_core import ControlConfig
from masactrl_jobs.queue import enqueue_job, make_celery
from masactrl_jobs.store import JobStore
from tests.conftest import TINY_VOCABULARY, RedisServer, S3Server, free_port
from tests.worker.helpers import (
    REPO_ROOT,
    ManagedProcess,
    WebhookReceiver,
    python_command,
    tiny_catalog,
    wait_for,
)
from worker.outputs import png_bytes

pytestmark = pytest.mark.slow

API_KEY = "e2e-test-key-" + "3f9a1c77d2"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e webhook secret of tenant acm").decode()
# A second tenant, for the queue policy: fair share between it and acme.
BETA_KEY = "e2e-beta-key-" + "81c0e4a95b"
BETA_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e webhook secret of tenant bet").decode()
STEP_DELAY = 0.05
STARTUP_TIMEOUT = 120.0  # importing torch and loading the model on a busy 2-core machine
JOB_TIMEOUT = 60.0


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Stack:
    """The running service and handles on its parts."""

    env: dict[str, str]
    log_dir: Path
    base_url: str
    redis: RedisServer
    s3: S3Server
    prefix: str
    receiver: WebhookReceiver
    gateway: ManagedProcess
    gpu: ManagedProcess
    hooks: ManagedProcess
    client: httpx.Client
    store: JobStore
    processes: list[ManagedProcess] = field(default_factory=list)

    # -- HTTP
    def submit(self, kind: str, body: dict[str, Any], key: str = API_KEY) -> dict[str, Any]:
        response = self.client.post(f"/v1/{kind}", json=body, headers=_bearer(key))
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id: str, key: str = API_KEY) -> dict[str, Any] | None:
        try:
            response = self.client.get(f"/v1/jobs/{job_id}", headers=_bearer(key))
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None  # 503 while Redis restarts

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT, key: str = API_KEY) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.job(job_id, key)
            ended = ("succeeded", "failed", "canceled", "expired")
            return job if job and job["status"] in ended else None

        try:
            return wait_for(done, timeout, 0.1, f"job {job_id} to end")
        except AssertionError:
            print(self.gpu.log_tail(), file=sys.stderr)
            raise

    def wait_running(self, job_id: str, min_step: int = 1) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            job = self.job(job_id)
            assert job is None or job["status"] in ("queued", "running"), job
            if (
                job
                and job["status"] == "running"
                and (job["progress"] or {}).get("step", 0) >= (min_step)
            ):
                return job
            return None

        return wait_for(running, JOB_TIMEOUT, 0.02, f"job {job_id} to run")

    # -- storage
    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint_url,
            aws_access_key_id=self.s3.access_key,
            aws_secret_access_key=self.s3.secret_key,
            region_name=self.s3.region,
        )

    def stored_keys(self, prefix: str) -> list[str]:
        listing = self.s3_client().list_objects_v2(
            Bucket=self.s3.bucket, Prefix=f"{self.prefix}/{prefix}"
        )
        return sorted(
            item["Key"].removeprefix(self.prefix + "/") for item in listing.get("Contents", [])
        )

    # -- processes
    def start_gpu_worker(self) -> ManagedProcess:
        self.gpu = ManagedProcess(
            f"gpu-worker-{len(self.processes)}",
            python_command("-m", "masactrl_cli.main", "worker", "--model", "tiny"),
            self.env,
            self.log_dir,
        ).start()
        self.processes.append(self.gpu)
        return self.gpu

    def wait_gpu_live(self, exclude: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        def live() -> bool:
            assert self.gpu.alive, self.gpu.log_tail()
            members = self.store.redis.zrangebyscore("masactrl:workers:tiny", time.time(), "+inf")
            return bool(set(members) - exclude)

        wait_for(live, STARTUP_TIMEOUT, 0.2, "the GPU worker to load its model")


def _png(seed: int, size: int = 64) -> bytes:
    image = Image.effect_noise((size, size), 30 + seed).convert("RGB")
    return png_bytes(image)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def e2e_controlnet(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ControlNet the stack's model offers as ``canny`` (loaded only by jobs naming it)."""
    from masactrl_core.tiny_conditions import write_tiny_condition_model

    out = tmp_path_factory.mktemp("e2e-controlnet") / "canny"
    return write_tiny_condition_model(out, kind="controlnet", base=tiny_checkpoint, seed=3)


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer,
    s3_server: S3Server,
    tiny_vocabulary_checkpoint: Path,
    e2e_controlnet: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    log_dir = tmp_path_factory.mktemp("e2e-logs")
    receiver = WebhookReceiver().start()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    prefix = f"e2e-{secrets.token_hex(4)}"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(log_dir),
        "HF_HUB_OFFLINE": "1",
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_REDIS_URL": redis_server.url,
        "MASACTRL_STORAGE_URL": f"s3://{s3_server.bucket}/{prefix}",
        "MASACTRL_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "MASACTRL_S3_ACCESS_KEY_ID": s3_server.access_key,
        "MASACTRL_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "MASACTRL_S3_REGION": s3_server.region,
        "MASACTRL_URL_SIGNING_SECRET": "e2e-url-signing-secret-0123456789abcdef",
        "MASACTRL_PUBLIC_BASE_URL": base_url,
        # The tiny checkpoint declaring a vocabulary (same weights, so the engine run here on
        # tiny_checkpoint is still the reference): jobs with other words get warnings.
        "MASACTRL_CATALOG": tiny_catalog(
            tiny_vocabulary_checkpoint,
            conditions={"canny": {"source": str(e2e_controlnet), "kind": "controlnet"}},
        ),
        "MASACTRL_ALLOW_LOOPBACK_HTTP": "true",
        "MASACTRL_API_KEYS": json.dumps(
            [
                {
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "tenant": "acme",
                    "webhook_secret": WEBHOOK_SECRET,
                },
                {
                    "sha256": hashlib.sha256(BETA_KEY.encode()).hexdigest(),
                    "tenant": "beta",
                    "webhook_secret": BETA_WEBHOOK_SECRET,
                },
            ]
        ),
        "MASACTRL_RATE_LIMIT_PER_SECOND": "1000",
        "MASACTRL_RATE_LIMIT_BURST": "1000",
        "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
        # Worker: one torch thread (as the reference runs below), fast recovery, slow steps.
        "MASACTRL_TORCH_THREADS": "1",
        "MASACTRL_RECOVERY_SECONDS": "4",
        "MASACTRL_WORKER_HEARTBEAT_TTL_SECONDS": "3",
        "MASACTRL_STEP_DELAY_SECONDS": str(STEP_DELAY),
        "MASACTRL_PROGRESS_INTERVAL_SECONDS": "0",
        "MASACTRL_SOFT_TIME_LIMIT_SECONDS": "120",
        "MASACTRL_TIME_LIMIT_SECONDS": "150",
        "MASACTRL_VISIBILITY_TIMEOUT_SECONDS": "180",
        "MASACTRL_WEBHOOK_RETRY_DELAYS_SECONDS": "[0.3, 0.3, 0.3]",
        "MASACTRL_WEBHOOK_RETRY_JITTER": "0",
        "MASACTRL_WEBHOOK_PROGRESS_INTERVAL_SECONDS": "0.2",
        "MASACTRL_WEBHOOK_SCHEDULER_INTERVAL_SECONDS": "0.1",
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
    hooks = ManagedProcess(
        "webhook-worker",
        python_command("-m", "masactrl_cli.main", "worker", "--webhooks", "--concurrency", "4"),
        env,
        log_dir,
    ).start()
    store = JobStore.from_url(redis_server.url)
    client = httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )
    stack = Stack(
        env=env,
        log_dir=log_dir,
        base_url=base_url,
        redis=redis_server,
        s3=s3_server,
        prefix=prefix,
        receiver=receiver,
        gateway=gateway,
        gpu=None,  # type: ignore[arg-type]
        hooks=hooks,
        client=client,
        store=store,
        processes=[gateway, hooks],
    )
    try:
        stack.start_gpu_worker()

        def gateway_up() -> bool:
            assert gateway.alive, gateway.log_tail()
            try:
                return client.get("/livez").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(gateway_up, STARTUP_TIMEOUT, 0.2, "the gateway")
        stack.wait_gpu_live()
        yield stack
    finally:
        client.close()
        for process in reversed(stack.processes):
            process.stop()
        store.close()
        receiver.stop()


@pytest.fixture(scope="module")
def reference_engine(tiny_checkpoint: Path) -> Iterator[Any]:
    """The engine run directly in this process, on one thread like the worker."""
    import torch

    from masactrl_core import MasaCtrlEngine

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    torch.set_num_threads(before)


def _control(job: dict[str, Any]) -> ControlConfig:
    control = job["input"]["control"]
    return ControlConfig(
        start_step=control["start_step"],
        start_layer=control["start_layer"],
        layers=control["layers"],
        steps=control["steps"],
    )


def _download(job: dict[str, Any]) -> list[bytes]:
    return [httpx.get(image["url"], timeout=10).content for image in job["output"]["images"]]


# --- the happy paths -------------------------------------------------------------------------


def test_synthesis_and_edit_end_byte_identical_to_the_engine_with_signed_webhooks(
    stack: Stack, reference_engine: Any
) -> None:
    models = stack.client.get("/v1/models").json()["data"]
    assert [(m["name"], m["live"]) for m in models] == [("tiny", True)]

    hook = {"url": stack.receiver.url("/all"), "events": ["started", "progress", "completed"]}
    synthesis = stack.submit(
        "syntheses",
        {
            "source_prompt": "a photo of a cat",
            "target_prompts": ["a photo of a dog", "a red car"],
            "steps": 4,
            "seed": 42,
            "webhook": hook,
        },
    )
    photo = _png(1)
    edit = stack.submit(
        "edits",
        {
            "image": _data_url(photo),
            "source_prompt": "a photo of a cat",
            "target_prompts": ["a photo of a cat standing"],
            "steps": 4,
        },
    )
    synthesis, edit = stack.wait(synthesis["id"]), stack.wait(edit["id"])
    assert synthesis["status"] == "succeeded", synthesis
    assert edit["status"] == "succeeded", edit
    assert synthesis["attempts"] == edit["attempts"] == 1
    metrics = synthesis["metrics"]
    assert metrics["unet_image_evals"] > 0 and metrics["total_seconds"] >= metrics["queue_seconds"]

    params = synthesis["input"]
    expected = reference_engine.synthesize(
        params["source_prompt"],
        params["target_prompts"],
        seed=params["seed"],
        steps=params["steps"],
        guidance_scale=params["guidance_scale"],
        width=params["width"],
        height=params["height"],
        control=_control(synthesis),
    )
    assert _download(synthesis) == [png_bytes(i) for i in (expected.source, *expected.targets)]

    params = edit["input"]
    assert params["image"] == f"inputs/{hashlib.sha256(photo).hexdigest()}.png"
    expected = reference_engine.edit(
        Image.open(io.BytesIO(photo)).convert("RGB"),
        params["target_prompts"],
        source_prompt=params["source_prompt"],
        seed=params["seed"],
        steps=params["steps"],
        guidance_scale=params["guidance_scale"],
        width=params["width"],
        height=params["height"],
        control=_control(edit),
    )
    assert _download(edit) == [png_bytes(i) for i in (expected.source, *expected.targets)]

    # Webhooks: every event signed, in the order it happened, the last one the final job.
    received = wait_for(
        lambda: (
            (r := stack.receiver.for_path("/all")) and r[-1].json()["type"] == "job.succeeded" and r
        ),
        JOB_TIMEOUT,
        what="the job.succeeded webhook",
    )
    verifier = Webhook(WEBHOOK_SECRET)
    bodies = [verifier.verify(r.body, r.headers) for r in received]
    types = [b["type"] for b in bodies]
    assert types[0] == "job.started" and types[-1] == "job.succeeded"
    assert set(types[1:-1]) == {"job.progress"}
    progress = [
        (b["data"]["progress"]["phase"], b["data"]["progress"]["step"]) for b in bodies[1:-1]
    ]
    assert progress == sorted(progress)
    assert bodies[-1]["data"]["id"] == synthesis["id"]
    assert bodies[-1]["data"]["output"]["images"][0]["key"].startswith(
        f"results/{synthesis['id']}/"
    )
    job = stack.job(synthesis["id"])
    assert job is not None
    assert len(job["webhook"]["deliveries"]) == len(received)
    assert {d["status_code"] for d in job["webhook"]["deliveries"]} == {200}


def test_webhook_url_tokens_stay_out_of_the_worker_logs(stack: Stack) -> None:
    token = "tok_" + secrets.token_hex(12)
    path = f"/tokened?token={token}"
    stack.receiver.scripts[path] = [503]  # one failure: a warning and a retry, logged too
    job = stack.submit(
        "syntheses",
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "steps": 2,
            "webhook": {"url": stack.receiver.url(path), "events": ["started", "completed"]},
        },
    )
    assert stack.wait(job["id"])["status"] == "succeeded"
    wait_for(
        lambda: any(r.json()["type"] == "job.succeeded" for r in stack.receiver.for_path(path)),
        JOB_TIMEOUT,
        what="the job.succeeded webhook",
    )
    logs = {
        process.log_path.name: process.log_path.read_text(errors="replace")
        for process in (stack.gpu, stack.hooks)
    }
    assert "HTTP Request: POST" in logs["webhook-worker.log"]
    for name, text in logs.items():
        assert token not in text, f"{name} logged the webhook token"


def test_a_receiver_failing_twice_gets_three_recorded_deliveries(stack: Stack) -> None:
    stack.receiver.scripts["/flaky"] = [500, 500]
    job = stack.submit(
        "syntheses",
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "steps": 2,
            "webhook": {"url": stack.receiver.url("/flaky"), "events": ["completed"]},
        },
    )
    assert stack.wait(job["id"])["status"] == "succeeded"

    def three_recorded() -> list[dict[str, Any]] | None:
        current = stack.job(job["id"])
        deliveries = current["webhook"]["deliveries"] if current else []
        return deliveries if len(deliveries) == 3 else None

    deliveries = wait_for(three_recorded, 20, 0.1, "three deliveries")
    assert [(d["attempt"], d["status_code"]) for d in deliveries] == [(1, 500), (2, 500), (3, 200)]
    received = stack.receiver.for_path("/flaky")
    assert len(received) == 3
    assert len({r.headers["webhook-id"] for r in received}) == 1  # one event, three attempts
    for request in received:
        assert Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)["type"] == (
            "job.succeeded"
        )


def test_a_second_edit_of_the_same_image_skips_inversion(
    stack: Stack, reference_engine: Any
) -> None:
    photo = _png(2)
    body = {"image": _data_url(photo), "source_prompt": "a photo of a cat", "steps": 4}
    first = stack.wait(stack.submit("edits", {**body, "target_prompts": ["a dog"]})["id"])
    second = stack.wait(stack.submit("edits", {**body, "target_prompts": ["a red car"]})["id"])
    assert first["status"] == second["status"] == "succeeded"
    m1, m2 = first["metrics"], second["metrics"]
    assert m1["inversion_seconds"] > 0 and m2["inversion_seconds"] == 0
    assert m2["unet_image_evals"] == m1["unet_image_evals"] - 4  # one UNet image per step
    # The cache changes nothing in the result.
    params = second["input"]
    expected = reference_engine.edit(
        Image.open(io.BytesIO(photo)).convert("RGB"),
        params["target_prompts"],
        source_prompt=params["source_prompt"],
        steps=params["steps"],
        width=params["width"],
        height=params["height"],
        control=_control(second),
    )
    assert _download(second)[1] == png_bytes(expected.targets[0])


def test_prompt_words_outside_the_models_vocabulary_are_the_jobs_warnings(stack: Stack) -> None:
    known = stack.submit(
        "syntheses", {"source_prompt": "a photo of a cat", "target_prompts": ["a dog"], "steps": 2}
    )
    unknown = stack.submit(
        "syntheses",
        {
            "source_prompt": "a photo of a cat",
            "target_prompts": ["a photo of a dog", "a house and a cat"],
            "negative_prompt": "blurry",
            "steps": 2,
        },
    )
    known, unknown = stack.wait(known["id"]), stack.wait(unknown["id"])
    assert known["status"] == unknown["status"] == "succeeded"
    assert known["warnings"] == []
    trained_on = (
        f"it was trained on {len(TINY_VOCABULARY)} words: {', '.join(sorted(TINY_VOCABULARY))}"
    )
    assert unknown["warnings"] == [
        f"target_prompts[1]: the model does not know the words 'house', 'and'; {trained_on}, "
        "so the picture may not show what the prompt asks",
        f"negative_prompt: the model does not know the word 'blurry'; {trained_on}, "
        "so the picture may not show what the prompt asks",
    ]
    listed = stack.client.get("/v1/jobs", params={"limit": 5}).json()["data"]
    assert {job["id"]: job["warnings"] for job in listed}[unknown["id"]] == unknown["warnings"]


# --- cancel and failures ------------------------------------------------------------------------


def test_cancel_of_a_running_job_stops_within_a_step_or_two(stack: Stack) -> None:
    job = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 60}
    )
    stack.wait_running(job["id"], min_step=3)
    response = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    step_at_cancel = response.json()["progress"]["step"]

    final = stack.wait(job["id"])
    assert final["status"] == "canceled"
    assert final["progress"]["step"] <= step_at_cancel + 2
    assert final["output"] is None
    assert stack.stored_keys(f"results/{job['id']}/") == []


def test_an_image_that_breaks_in_the_worker_fails_clearly_and_the_next_job_runs(
    stack: Stack,
) -> None:
    # Keep the worker busy so the edit waits in the queue while its input is damaged.
    busy = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 30}
    )
    photo = _png(3)
    broken = stack.submit(
        "edits", {"image": _data_url(photo), "target_prompts": ["a dog"], "steps": 2}
    )
    assert broken["status"] == "queued"
    # The gateway checked and stored the image; then the stored object is cut short (a
    # partial replica of an S3-compatible store, a bad disk): only the worker can notice.
    stack.s3_client().put_object(
        Bucket=stack.s3.bucket,
        Key=f"{stack.prefix}/{broken['input']['image']}",
        Body=photo[: len(photo) // 3],
    )
    after = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 2}
    )

    failed = stack.wait(broken["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_input"
    assert "cannot be decoded" in failed["error"]["message"]
    assert "Traceback" not in failed["error"]["message"]
    assert stack.wait(busy["id"])["status"] == "succeeded"
    assert stack.wait(after["id"])["status"] == "succeeded"


# --- crashes and restarts (these stop processes; keep them last) --------------------------------


QUICK = {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 1}


def _started_before(stack: Stack, jobs: list[dict[str, Any]], key: str = API_KEY) -> list[float]:
    finals = [stack.wait(j["id"], key=key) for j in jobs]
    assert all(f["status"] == "succeeded" and f["attempts"] == 1 for f in finals), finals
    return sorted(datetime.fromisoformat(f["started_at"]).timestamp() for f in finals)


def test_a_light_tenant_starts_within_one_job_of_a_heavy_tenants_batch(stack: Stack) -> None:
    heavy = [stack.submit("syntheses", QUICK) for _ in range(30)]
    light = stack.submit("syntheses", QUICK, key=BETA_KEY)
    # Heavy jobs started by now (counted after the light job was queued: no fewer than then).
    running = sum(1 for j in heavy if (stack.job(j["id"]) or {}).get("status") != "queued")
    # At most the heavy jobs already started, plus one, start before the light one.
    assert light["queue_position"] <= 2, light
    final = stack.wait(light["id"], key=BETA_KEY)
    assert (final["status"], final["attempts"]) == ("succeeded", 1), final
    light_start = datetime.fromisoformat(final["started_at"]).timestamp()
    heavy_starts = _started_before(stack, heavy)
    ahead = sum(1 for t in heavy_starts if t < light_start)
    assert ahead <= running + 1, (ahead, running)


def test_an_expired_job_never_runs_and_is_announced_once(stack: Stack) -> None:
    hook = stack.receiver.url("/expired")
    blocker = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 40}
    )
    stack.wait_running(blocker["id"], min_step=1)
    late = stack.submit("syntheses", {**QUICK, "max_queue_seconds": 1, "webhook": {"url": hook}})
    final = stack.wait(late["id"])
    assert final["status"] == "expired" and final["started_at"] is None, final
    assert final["attempts"] == 0
    assert stack.wait(blocker["id"])["status"] == "succeeded"
    with stack.client.stream("GET", f"/v1/jobs/{late['id']}/events") as response:
        names = [line for line in response.iter_lines() if line.startswith("event:")]
    assert names == ["event: status", "event: expired"]

    def announced() -> list[Any] | None:
        hooks = [r.json()["type"] for r in stack.receiver.for_path("/expired")]
        return hooks or None

    assert wait_for(announced, 10, 0.1, "the job.expired webhook") == ["job.expired"]
    time.sleep(1.0)  # a second announcement would have come by now
    assert [r.json()["type"] for r in stack.receiver.for_path("/expired")] == ["job.expired"]
    assert stack.stored_keys(f"results/{late['id']}/") == []

    # A retry runs it once, and both jobs link to each other.
    response = stack.client.post(f"/v1/jobs/{late['id']}/retry")
    assert response.status_code == 201, response.text
    retried = stack.wait(response.json()["id"])
    assert (retried["status"], retried["attempts"]) == ("succeeded", 1), retried
    assert retried["retry_of"] == late["id"]
    assert (stack.job(late["id"]) or {})["retried_by"] == retried["id"]


def test_a_job_survives_sigkill_of_its_worker_and_completes_exactly_once(stack: Stack) -> None:
    job = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 40}
    )
    stack.wait_running(job["id"], min_step=5)
    # Queued behind it, from both tenants, with priorities: the queue policy's starts.
    waiting = [(stack.submit("syntheses", {**QUICK, "priority": p}), API_KEY) for p in (0, 5)]
    waiting += [(stack.submit("syntheses", QUICK, key=BETA_KEY), BETA_KEY) for _ in range(2)]
    dead_workers = set(stack.store.redis.zrange("masactrl:workers:tiny", 0, -1))
    stack.gpu.kill(signal.SIGKILL)  # the whole group: Celery's parent and its pool child

    stack.start_gpu_worker()
    stack.wait_gpu_live(exclude=dead_workers)
    final = stack.wait(job["id"], timeout=JOB_TIMEOUT + STARTUP_TIMEOUT)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    for queued, key in waiting:  # nothing lost, nothing run twice
        done = stack.wait(queued["id"], key=key)
        assert (done["status"], done["attempts"]) == ("succeeded", 1), done
        events = stack.store.read_events(queued["id"])
        assert [e.event for e in events].count("succeeded") == 1
    assert stack.stored_keys(f"results/{job['id']}/") == [
        f"results/{job['id']}/source_0.png",
        f"results/{job['id']}/target_0.png",
    ]

    # The broker's own redelivery of the dead worker's message, whenever it comes, is dropped.
    app = make_celery(stack.redis.url)
    enqueue_job(app, job["id"], "tiny")
    app.close()
    marker = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 1}
    )
    # Under the queue policy the duplicate is one more start for the model: it starts the marker
    # or nothing, never the ended job again.
    assert stack.wait(marker["id"])["status"] == "succeeded"
    again = stack.job(job["id"])
    assert again is not None and again["attempts"] == 2 and again["status"] == "succeeded"


def test_a_queued_job_survives_a_redis_restart(stack: Stack) -> None:
    running = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"], "steps": 40}
    )
    waiting = stack.submit(
        "syntheses", {"source_prompt": "a cat", "target_prompts": ["a red car"], "steps": 2}
    )
    other = stack.submit("syntheses", {**QUICK, "priority": 3}, key=BETA_KEY)
    stack.wait_running(running["id"], min_step=2)
    assert (stack.job(waiting["id"]) or {}).get("status") == "queued"

    stack.redis.restart()  # SIGTERM: Redis writes its AOF and exits; then it starts from it

    assert stack.wait(waiting["id"], timeout=JOB_TIMEOUT * 2)["status"] == "succeeded"
    done = stack.wait(other["id"], timeout=JOB_TIMEOUT * 2, key=BETA_KEY)
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    final = stack.wait(running["id"], timeout=JOB_TIMEOUT * 2)
    # The running job rode through the restart: one attempt, not a rerun.
    assert (final["status"], final["attempts"]) == ("succeeded", 1), final


# --- sequences -------------------------------------------------------------------------------


def _layout(seed: int) -> Image.Image:
    return Image.effect_noise((64, 64), 30 + 20 * seed).convert("RGB")


def test_a_sequence_from_a_video_ends_equal_to_the_engine_with_frames_and_animations(
    stack: Stack, reference_engine: Any, e2e_controlnet: Path
) -> None:
    from masactrl_core.canny import canny
    from masactrl_core.conditions import Condition
    from masactrl_jobs.media import VideoBudget, decode_video, encode_mp4, probe_video

    budget = VideoBudget.defaults(120)

    video = encode_mp4([_layout(k) for k in range(4)], 4.0)
    params = {
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a dog"],
        "condition": {"model": "canny", "fps": 4, "max_frames": 3, "preprocess": "canny"},
        "steps": 3,
        "seed": 11,
        "fps": 6,
    }
    response = stack.client.post(
        "/v1/sequences",
        files=[("video", ("clip.mp4", video, "video/mp4"))],
        data={"params": json.dumps(params)},
    )
    assert response.status_code == 202, response.text
    job = stack.wait(response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "sequence" and job["progress"]["frames_done"] == 3
    roles = [(image["role"], image["key"].rsplit("/", 1)[-1]) for image in job["output"]["images"]]
    assert roles == [
        ("source", "source_0.png"),
        *[("frame", f"frame_{k}.png") for k in range(3)],
        ("animation", "sequence.mp4"),
        ("animation", "sequence.webp"),
    ]

    layouts = [canny(frame) for frame in decode_video(video, budget=budget, fps=4, max_frames=3)]
    model = reference_engine.load_condition_model(str(e2e_controlnet))
    expected = reference_engine.sequence(
        "a photo of a cat",
        "a photo of a dog",
        Condition(model, layouts),
        seed=11,
        steps=3,
        width=64,
        height=64,
        control=_control(job),
    )
    downloaded = _download(job)
    assert downloaded[1:4] == [png_bytes(frame) for frame in expected.frames]
    info = probe_video(downloaded[4])
    assert (info.frame_count, round(info.fps)) == (3, 6)


def test_cancel_of_a_running_sequence_stops_within_a_step_or_two(stack: Stack) -> None:
    body = {
        "source_prompt": "a cat",
        "target_prompts": ["a dog"],
        "steps": 60,
        "condition": {
            "model": "canny",
            "frames": [_data_url(png_bytes(_layout(k))) for k in range(3)],
        },
    }
    job = stack.submit("sequences", body)
    stack.wait_running(job["id"], min_step=3)
    response = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    step_at_cancel = response.json()["progress"]["step"]

    final = stack.wait(job["id"])
    assert final["status"] == "canceled"
    assert final["progress"]["step"] <= step_at_cancel + 2
    assert final["progress"]["frames_done"] == 0
    assert final["output"] is None
    assert stack.stored_keys(f"results/{job['id']}/") == []
