"""Submitting jobs: edits (JSON and multipart) and syntheses, validation, idempotency, limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from masactrl_jobs.schema import JobKind, JobStatus, SynthesisCreate
from masactrl_jobs.store import JobStore
from service.config import GatewaySettings
from service.submission import Submitted, submit
from tests.images import data_url, png_bytes
from tests.service.conftest import ACME_KEY, GLOBEX_KEY, SYNTHESIS, bearer, broker_messages


def edit_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": data_url(png_bytes()),
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a cat wearing a hat"],
    }
    body.update(overrides)
    return body


REPO = Path(__file__).resolve().parents[2]


def storage_root(settings: GatewaySettings) -> Path:
    return Path(settings.storage_url.removeprefix("file://"))


# --- acceptance -------------------------------------------------------------------------------


def test_synthesis_is_accepted_recorded_and_enqueued(
    client: TestClient, redis_client: redis.Redis
) -> None:
    response = client.post("/v1/syntheses", json=SYNTHESIS)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == job["urls"]["self"]
    assert job["urls"]["self"] == f"http://testserver/v1/jobs/{job['id']}"
    assert job["kind"] == "synthesis" and job["status"] == "queued" and job["model"] == "sd15"
    assert job["queue_position"] == 1 and job["attempts"] == 0
    assert job["started_at"] is None and job["output"] is None and job["error"] is None
    # Defaults are resolved at the gateway so the worker runs exactly what is shown.
    assert job["input"]["width"] == 512 and job["input"]["height"] == 512
    assert job["input"]["steps"] == 50 and job["input"]["guidance_scale"] == 7.5
    assert job["input"]["control"]["start_step"] == 4
    assert job["input"]["control"]["start_layer"] == 10
    assert isinstance(job["input"]["seed"], int)
    assert broker_messages(redis_client, "masactrl.sd15") == [("masactrl.run_job", [job["id"]])]
    assert client.get(f"/v1/jobs/{job['id']}").json()["input"]["seed"] == job["input"]["seed"]


def test_explicit_parameters_are_echoed(client: TestClient, redis_client: redis.Redis) -> None:
    body = {
        **SYNTHESIS,
        "model": "sdxl",
        "seed": 1234,
        "steps": 20,
        "guidance_scale": 5,
        "width": 1024,
        "height": 768,
        "negative_prompt": "blurry",
        "control": {"start_step": 3, "start_layer": 60, "layers": [60, 69], "steps": [3, 19]},
        "webhook": {"url": "https://hooks.example.com/masactrl", "events": ["completed"]},
    }
    job = client.post("/v1/syntheses", json=body).json()
    assert job["model"] == "sdxl" and job["input"]["seed"] == 1234
    assert (job["input"]["width"], job["input"]["height"]) == (1024, 768)
    assert job["input"]["control"]["layers"] == [60, 69]
    assert job["webhook"] == {
        "url": "https://hooks.example.com/masactrl",
        "events": ["completed"],
        "deliveries": [],
    }
    assert broker_messages(redis_client, "masactrl.sdxl") == [("masactrl.run_job", [job["id"]])]
    # The tenant's signing secret travels with the job for the webhook worker, never outward.
    record = JobStore(redis_client).get(job["id"])
    assert record.webhook_secrets[0].startswith("whsec_")
    assert "whsec_" not in json.dumps(job)


def test_short_runs_clamp_the_default_start_step(client: TestClient) -> None:
    job = client.post("/v1/syntheses", json={**SYNTHESIS, "steps": 2}).json()
    assert job["input"]["control"]["start_step"] == 2


def test_edit_as_json_stores_the_image_content_addressed(
    client: TestClient, settings: GatewaySettings, redis_client: redis.Redis
) -> None:
    image = png_bytes()
    response = client.post("/v1/edits", json=edit_body(image=data_url(image)))
    assert response.status_code == 202, response.text
    job = response.json()
    import hashlib

    key = f"inputs/{hashlib.sha256(image).hexdigest()}.png"
    assert job["kind"] == "edit" and job["input"]["image"] == key
    assert (storage_root(settings) / key).read_bytes() == image
    assert "base64" not in response.text
    assert broker_messages(redis_client, "masactrl.sd15") == [("masactrl.run_job", [job["id"]])]


def test_edit_as_multipart(client: TestClient, settings: GatewaySettings) -> None:
    image = png_bytes(80, 64)
    params = {"target_prompts": ["a dog"], "seed": 7}
    response = client.post(
        "/v1/edits",
        # The name and declared type lie; the content decides.
        files={"image": ("photo.jpg", image, "image/jpeg")},
        data={"params": json.dumps(params)},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["input"]["image"].endswith(".png") and job["input"]["seed"] == 7
    assert (storage_root(settings) / job["input"]["image"]).read_bytes() == image


def test_edit_as_multipart_with_params_as_a_json_file(client: TestClient) -> None:
    response = client.post(
        "/v1/edits",
        files={
            "image": ("a.png", png_bytes(), "image/png"),
            "params": ("params.json", b'{"target_prompts": ["a dog"]}', "application/json"),
        },
    )
    assert response.status_code == 202, response.text


def test_a_multipart_edit_asks_for_previews_with_a_form_field(client: TestClient) -> None:
    def post(data: dict[str, Any]) -> Any:
        files = {"image": ("a.png", png_bytes(), "image/png")}
        return client.post("/v1/edits", files=files, data=data)

    params = json.dumps({"target_prompts": ["a dog"]})
    asked = post({"params": params, "previews": "true"})
    assert asked.status_code == 202, asked.text
    assert asked.json()["input"]["previews"] is True
    assert post({"params": params, "previews": "false"}).json()["input"]["previews"] is False
    assert post({"params": params}).json()["input"]["previews"] is False
    in_params = json.dumps({"target_prompts": ["a dog"], "previews": True})
    assert post({"params": in_params}).json()["input"]["previews"] is True
    for data, message in [
        ({"params": params, "previews": "yes"}, "previews must be true or false"),
        ({"params": in_params, "previews": "true"}, "give previews once"),
    ]:
        refused = post(data)
        assert refused.status_code == 422, refused.text
        detail = refused.json()["error"]["details"][0]
        assert detail["loc"] == ["body", "previews"] and message in detail["message"]


def test_json_jobs_ask_for_previews_and_only_with_a_boolean(client: TestClient) -> None:
    body = {"source_prompt": "a cat", "target_prompts": ["a dog"], "previews": True}
    assert client.post("/v1/syntheses", json=body).json()["input"]["previews"] is True
    refused = client.post("/v1/syntheses", json={**body, "previews": "true"})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["loc"] == ["body", "previews"]


@pytest.mark.parametrize(
    ("files", "data", "loc"),
    [
        ({}, {"params": '{"target_prompts": ["x"]}'}, ["body", "image"]),
        ({"image": ("a.png", png_bytes(), "image/png")}, {}, ["body", "params"]),
        (
            {"image": ("a.png", png_bytes(), "image/png")},
            {"params": "{not json"},
            ["body", "params"],
        ),
        (
            {"image": ("a.png", png_bytes(), "image/png")},
            {"params": '{"target_prompts": ["x"], "image": "data:,"}'},
            ["body", "params", "image"],
        ),
        (
            {"image": ("a.png", png_bytes(), "image/png")},
            {"params": '{"target_prompts": ["x"]}', "extra": "1"},
            ["body", "extra"],
        ),
    ],
)
def test_multipart_errors(
    client: TestClient, files: dict[str, Any], data: dict[str, str], loc: list[str]
) -> None:
    if not files:
        # httpx sends urlencoded without files; force a multipart body with a dummy boundary.
        response = client.post(
            "/v1/edits",
            content=(
                b'--b\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
                + data["params"].encode()
                + b"\r\n--b--\r\n"
            ),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
    else:
        response = client.post("/v1/edits", files=files, data=data)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == loc


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    response = client.post("/v1/edits", content=b"image=1", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_oversized_body_is_413(make_settings: Callable[..., GatewaySettings], make_client) -> None:
    client = make_client(make_settings(max_request_bytes=4096))
    response = client.post("/v1/edits", json=edit_body(image=data_url(b"x" * 8000)))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    # Without a declared length (chunked), the limit still holds while the bytes arrive.
    chunks = iter([b'{"image": "', b"a" * 3000, b"a" * 3000, b'"}'])
    response = client.post(
        "/v1/edits", content=chunks, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


# --- authentication ---------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(settings: GatewaySettings, make_client) -> None:
    anonymous = make_client(settings, key=None)
    for headers in ({}, bearer("not-a-key"), {"Authorization": "Basic YTpi"}):
        response = anonymous.post("/v1/syntheses", json=SYNTHESIS, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        error = response.json()["error"]
        assert error["code"] == "unauthorized" and error["message"]
    for path in ("/v1/jobs", "/v1/models", "/v1/jobs/x", "/v1/jobs/x/events"):
        assert anonymous.get(path).status_code == 401
    assert anonymous.post("/v1/jobs/x/cancel").status_code == 401
    assert (
        anonymous.post("/v1/syntheses", json=SYNTHESIS, headers=bearer(GLOBEX_KEY)).status_code
        == 202
    )


def test_development_key(make_settings: Callable[..., GatewaySettings], make_client) -> None:
    client = make_client(
        make_settings(api_keys=[], dev_api_key="local-dev-key"), key="local-dev-key"
    )
    assert client.post("/v1/syntheses", json=SYNTHESIS).status_code == 202
    assert client.get("/v1/jobs").json()["data"][0]["kind"] == "synthesis"


# --- validation -------------------------------------------------------------------------------

LONG = "x" * 1001

INVALID_SYNTHESES: list[tuple[dict[str, Any], list[Any]]] = [
    ({"guidence_scale": 7}, ["body", "guidence_scale"]),
    ({"source_prompt": LONG}, ["body", "source_prompt"]),
    ({"source_prompt": ""}, ["body", "source_prompt"]),
    ({"negative_prompt": LONG}, ["body", "negative_prompt"]),
    ({"target_prompts": []}, ["body", "target_prompts"]),
    ({"target_prompts": ["a"] * 9}, ["body", "target_prompts"]),
    ({"target_prompts": ["ok", " "]}, ["body", "target_prompts", 1]),
    ({"target_prompts": [LONG]}, ["body", "target_prompts", 0]),
    ({"steps": 0}, ["body", "steps"]),
    ({"steps": 151}, ["body", "steps"]),
    ({"guidance_scale": 30.5}, ["body", "guidance_scale"]),
    ({"guidance_scale": -1}, ["body", "guidance_scale"]),
    ({"seed": -1}, ["body", "seed"]),
    ({"steps": 10, "control": {"start_step": 11}}, ["body", "control", "start_step"]),
    ({"steps": 10, "control": {"steps": [2, 10]}}, ["body", "control", "steps"]),
    ({"control": {"start_layer": 16}}, ["body", "control", "start_layer"]),
    ({"control": {"layers": [3, 16]}}, ["body", "control", "layers"]),
    ({"control": {"mode": "auto"}}, ["body", "control", "mode"]),
    ({"width": 500}, ["body", "width"]),
    ({"height": 520}, ["body", "height"]),
    ({"width": 2048, "height": 1024}, ["body", "width"]),
    ({"model": "sd99"}, ["body", "model"]),
    ({"control": {"mask": {"mode": "manual"}}}, ["body", "control", "mask", "regions"]),
    ({"control": {"mask": {"mode": "auto"}}}, ["body", "control", "mask", "source_word"]),
    (
        {"control": {"mask": {"mode": "auto", "source_word": "dog", "target_word": "cat"}}},
        ["body", "control", "mask", "source_word"],
    ),
    (
        {"control": {"mask": {"mode": "auto", "source_word": "cat", "target_word": "dog"}}},
        ["body", "control", "mask", "target_word"],
    ),
    ({"control": {"mask": {"source_word": "cat"}}}, ["body", "control", "mask", "source_word"]),
    (
        {"control": {"mask": {"mode": "auto", "threshold": 1.5}}},
        ["body", "control", "mask", "threshold"],
    ),
    ({"control": {"mask": {"mode": "sometimes"}}}, ["body", "control", "mask", "mode"]),
    ({"webhook": {"url": "http://hooks.example.com/"}}, ["body", "webhook", "url"]),
    ({"webhook": {"url": "https://10.0.0.7/hook"}}, ["body", "webhook", "url"]),
    ({"webhook": {"url": "https://user:pw@example.com/"}}, ["body", "webhook", "url"]),
    (
        {"webhook": {"url": "https://a.example/", "events": ["finished"]}},
        ["body", "webhook", "events", 0],
    ),
]


@pytest.mark.parametrize(("patch", "loc"), INVALID_SYNTHESES)
def test_invalid_synthesis_is_422_with_path_and_sentence(
    client: TestClient, redis_client: redis.Redis, patch: dict[str, Any], loc: list[Any]
) -> None:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, **patch})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0]["loc"] == loc
    assert error["details"][0]["message"] and error["details"][0]["type"]
    # The summary names the field so a log line alone says what to fix.
    assert str(loc[-1]) in error["message"]
    assert broker_messages(redis_client, "masactrl.sd15") == []


def test_unknown_fields_and_broken_json_read_well(client: TestClient) -> None:
    error = client.post("/v1/syntheses", json={**SYNTHESIS, "guidence_scale": 1}).json()["error"]
    assert error["details"][0]["message"] == "unknown field 'guidence_scale'"
    assert error["details"][0]["type"] == "extra_forbidden"
    response = client.post(
        "/v1/edits", content=b'{"image": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]["message"]
    response = client.post(
        "/v1/syntheses", content=b'{"a": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


def test_edit_specific_validation(client: TestClient) -> None:
    response = client.post("/v1/edits", json={"target_prompts": ["x"]})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "image"]
    response = client.post("/v1/edits", json=edit_body(image="ftp://example.com/a.png"))
    assert response.json()["error"]["details"][0]["type"] == "invalid_image_reference"
    # Edits may leave the source prompt empty (inversion with an empty prompt).
    assert client.post("/v1/edits", json=edit_body(source_prompt="")).status_code == 202


def test_masks_auto_and_manual(client: TestClient, settings: GatewaySettings) -> None:
    auto = {
        **SYNTHESIS,
        "control": {
            "mask": {"mode": "auto", "source_word": "Cat", "target_word": "cat", "threshold": 0.3}
        },
    }
    job = client.post("/v1/syntheses", json=auto).json()
    assert job["input"]["control"]["mask"]["mode"] == "auto"
    assert job["input"]["control"]["mask"]["threshold"] == 0.3

    masks = {
        "source": data_url(png_bytes(color=(255, 255, 255))),
        "target": data_url(png_bytes(color=(0, 0, 0))),
    }
    manual = edit_body(control={"mask": {"mode": "manual", "regions": [masks]}})
    response = client.post("/v1/edits", json=manual)
    assert response.status_code == 202, response.text
    region = response.json()["input"]["control"]["mask"]["regions"][0]
    assert region["source"].startswith("inputs/") and region["target"].startswith("inputs/")
    assert (storage_root(settings) / region["source"]).is_file()
    bad = edit_body(control={"mask": {"mode": "manual", "regions": [{**masks, "target": "nope"}]}})
    error = client.post("/v1/edits", json=bad).json()["error"]
    assert error["details"][0]["loc"] == ["body", "control", "mask", "regions", 0, "target"]


# --- idempotency ------------------------------------------------------------------------------


def test_idempotency_key_replays_the_original(
    client: TestClient, redis_client: redis.Redis
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/syntheses", json=SYNTHESIS, headers=headers)
    assert first.status_code == 202
    # Same content, different spelling: key order, whitespace, defaults written out.
    same = json.dumps(
        {
            "target_prompts": SYNTHESIS["target_prompts"],
            "steps": 50,
            "source_prompt": SYNTHESIS["source_prompt"],
        },
        indent=3,
    )
    again = client.post(
        "/v1/syntheses", content=same, headers={**headers, "Content-Type": "application/json"}
    )
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert len(broker_messages(redis_client, "masactrl.sd15")) == 1

    different = client.post("/v1/syntheses", json={**SYNTHESIS, "steps": 20}, headers=headers)
    assert different.status_code == 422
    error = different.json()["error"]
    assert error["details"][0]["loc"] == ["header", "Idempotency-Key"]
    assert error["details"][0]["type"] == "idempotency_key_reused"
    # Same key, other endpoint: a different request.
    assert client.post("/v1/edits", json=edit_body(), headers=headers).status_code == 422

    # Keys are scoped per tenant.
    other = client.post("/v1/syntheses", json=SYNTHESIS, headers={**headers, **bearer(GLOBEX_KEY)})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_idempotent_multipart_edit(client: TestClient) -> None:
    def send(image: bytes) -> Any:
        return client.post(
            "/v1/edits",
            files={"image": ("a.png", image, "image/png")},
            data={"params": '{"target_prompts": ["x"]}'},
            headers={"Idempotency-Key": "upload-1"},
        )

    first = send(png_bytes())
    assert first.status_code == 202
    assert send(png_bytes()).json()["id"] == first.json()["id"]
    assert send(png_bytes(color=(1, 2, 3))).status_code == 422


def test_concurrent_duplicates_create_one_job(
    client: TestClient, redis_client: redis.Redis
) -> None:
    results: list[int] = []

    def submit() -> None:
        response = client.post("/v1/edits", json=edit_body(), headers={"Idempotency-Key": "race"})
        results.append(response.status_code)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [200] * 5 + [202]
    assert len(broker_messages(redis_client, "masactrl.sd15")) == 1


# --- backpressure -----------------------------------------------------------------------------


def test_full_model_queue_is_429_with_retry_after(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(max_queue_depth=2, queue_full_retry_after_seconds=7))
    for _ in range(2):
        assert client.post("/v1/syntheses", json=SYNTHESIS).status_code == 202
    for response in (
        client.post("/v1/syntheses", json=SYNTHESIS),
        client.post("/v1/edits", json=edit_body()),
    ):
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"]["code"] == "queue_full"
    # Another model's queue is independent.
    assert client.post("/v1/syntheses", json={**SYNTHESIS, "model": "sdxl"}).status_code == 202
    # Cancelling a queued job frees its place.
    job_id = client.get("/v1/jobs", params={"limit": 3}).json()["data"][-1]["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.post("/v1/syntheses", json=SYNTHESIS).status_code == 202


def test_tenant_rate_limit_is_429(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    settings = make_settings(rate_limit_per_second=0.5, rate_limit_burst=2)
    client = make_client(settings)
    statuses = [client.post("/v1/syntheses", json=SYNTHESIS).status_code for _ in range(3)]
    assert statuses == [202, 202, 429]
    limited = client.post("/v1/syntheses", json=SYNTHESIS)
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    # Another tenant has its own bucket; reads are not limited.
    other = make_client(settings, key=GLOBEX_KEY)
    assert other.post("/v1/syntheses", json=SYNTHESIS).status_code == 202
    assert client.get("/v1/jobs").status_code == 200


# --- Prefer: wait ---------------------------------------------------------------------------


def _finish_soon(redis_url: str, job_holder: list[str], delay: float) -> threading.Thread:
    """A stand-in for a GPU worker: picks the job up and completes it through the job store."""

    def work() -> None:
        store = JobStore.from_url(redis_url)
        deadline = time.monotonic() + 10
        while not job_holder and time.monotonic() < deadline:
            queued = store.redis.lrange("masactrl.sd15", 0, -1)
            if queued:
                body = json.loads(queued[0])
                import base64

                job_holder.append(json.loads(base64.b64decode(body["body"]))[0][0])
            time.sleep(0.01)
        job_id = job_holder[0]
        time.sleep(delay)
        store.start(job_id, "fake-worker")
        store.progress(job_id, "denoise", 1, 2)
        store.succeed(job_id, [], {"denoise_seconds": 0.1})
        store.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_prefer_wait_on_submission(client: TestClient, redis_url: str) -> None:
    holder: list[str] = []
    worker = _finish_soon(redis_url, holder, delay=0.3)
    started = time.monotonic()
    response = client.post("/v1/syntheses", json=SYNTHESIS, headers={"Prefer": "wait=10"})
    elapsed = time.monotonic() - started
    worker.join()
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=10"
    assert response.json()["status"] == "succeeded"
    assert elapsed < 5


def test_prefer_wait_times_out_with_the_current_job(client: TestClient) -> None:
    started = time.monotonic()
    response = client.post(
        "/v1/syntheses", json=SYNTHESIS, headers={"Prefer": "respond-async, wait=1"}
    )
    assert 0.9 <= time.monotonic() - started < 4
    assert response.json()["status"] == "queued"
    job_id = response.json()["id"]
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=1"})
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert 0.9 <= time.monotonic() - started < 4
    # Beyond the cap: clamped to 60, and said so. Malformed: ignored.
    client.post(f"/v1/jobs/{job_id}/cancel")
    response = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=3600"})
    assert response.headers["preference-applied"] == "wait=60"
    response = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=soon"})
    assert response.status_code == 200 and "preference-applied" not in response.headers


def test_prefer_wait_on_get(client: TestClient, redis_url: str) -> None:
    job_id = client.post("/v1/syntheses", json=SYNTHESIS).json()["id"]
    worker = _finish_soon(redis_url, [job_id], delay=0.3)
    response = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=10"})
    worker.join()
    assert response.json()["status"] == "succeeded"


# --- the broker message --------------------------------------------------------------------


PROBE_WORKER = """
import os, redis
from masactrl_jobs.queue import RUN_JOB_TASK, make_celery

app = make_celery(os.environ["BROKER"])
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, worker_hijack_root_logger=False)


@app.task(name=RUN_JOB_TASK)
def run_job(job_id):
    redis.Redis.from_url(os.environ["BROKER"]).rpush("probe:ran", job_id)
"""


def test_a_real_celery_worker_runs_the_message(
    client: TestClient, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The message the store pushes is one Celery consumes and acknowledges like its own."""
    (tmp_path / "probe_worker.py").write_text(PROBE_WORKER)
    job_id = client.post("/v1/syntheses", json=SYNTHESIS).json()["id"]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "probe_worker",
            "worker",
            "--pool",
            "solo",
            "--queues",
            "masactrl.sd15",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "BROKER": redis_url,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # Polled, not BLPOP: the client's socket timeout is shorter than a slow worker start.
        deadline = time.monotonic() + 60
        while (ran := redis_client.lpop("probe:ran")) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ran == job_id
        deadline = time.monotonic() + 10
        # acks_late: acknowledged after the task, which empties kombu's unacked index.
        while redis_client.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.hlen("unacked") == 0
        assert redis_client.llen("masactrl.sd15") == 0
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0].decode()
    assert "Traceback" not in output, output


def test_acme_key_constant_is_used(client: TestClient) -> None:
    assert client.headers["authorization"] == f"Bearer {ACME_KEY}"


def test_submit_reports_a_domain_outcome_the_routes_turn_into_http(client: TestClient) -> None:
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    tenant = next(iter(gw.tenants.values()))
    body = SynthesisCreate.model_validate(SYNTHESIS)

    async def twice() -> tuple[Submitted, Submitted]:
        first = await submit(gw, tenant, JobKind.synthesis, body, idempotency_key="domain-1")
        again = await submit(gw, tenant, JobKind.synthesis, body, idempotency_key="domain-1")
        return first, again

    first, again = client.portal.call(twice)  # type: ignore[union-attr]
    assert isinstance(first, Submitted) and not first.replayed
    assert first.record.status is JobStatus.queued and first.record.queue_position == 1
    assert first.waited_seconds is None
    assert again.replayed and again.record.id == first.record.id
