"""Probes, metrics, models, outages, the OpenAPI contract, settings rules and the serve command."""

from __future__ import annotations

import base64
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from masactrl_jobs.catalog import default_catalog
from masactrl_jobs.store import JobStore
from service.api.contract import models_table
from service.config import ApiKeyConfig, GatewaySettings
from service.main import create_app
from service.openapi import openapi_document, render
from tests.conftest import free_port
from tests.service.conftest import ACME_KEY, SIGNING_SECRET, SYNTHESIS, bearer, sha256_hex

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "openapi" / "openapi.json"


def test_livez_and_readyz(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"redis": "ok", "storage": "ok"}}


def test_readyz_reports_unreachable_storage(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    settings = make_settings(
        storage_url="s3://nobucket/x",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_region="us-east-1",
    )
    response = make_client(settings).get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"redis": "ok", "storage": "unreachable"}


def test_a_full_redis_is_a_json_503_not_a_500(
    client: TestClient, redis_client: redis.Redis
) -> None:
    # Production Redis runs with maxmemory and noeviction: writes are refused once it is full.
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", "1")
    try:
        response = client.post("/v1/syntheses", json=SYNTHESIS)
    finally:
        redis_client.config_set("maxmemory", "0")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert response.json()["error"] == {
        "code": "service_unavailable",
        "message": "The job store is full; retry later.",
        "details": [],
    }


@pytest.fixture()
def down_client(make_settings: Callable[..., GatewaySettings], make_client) -> TestClient:
    """A gateway whose Redis does not answer (nothing listens on its port)."""
    return make_client(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))


def test_redis_down_is_a_json_503_everywhere(down_client: TestClient) -> None:
    calls = [
        ("POST", "/v1/syntheses", {"json": SYNTHESIS}),
        ("POST", "/v1/edits", {"json": {"image": "data:,", "target_prompts": ["x"]}}),
        ("GET", "/v1/jobs", {}),
        ("GET", "/v1/jobs/01890000-0000-7000-8000-000000000000", {}),
        ("POST", "/v1/jobs/01890000-0000-7000-8000-000000000000/cancel", {}),
        ("GET", "/v1/jobs/01890000-0000-7000-8000-000000000000/events", {}),
        ("GET", "/v1/models", {}),
    ]
    for method, path, kwargs in calls:
        response = down_client.request(method, path, **kwargs)
        assert response.status_code == 503, (path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"]
        assert response.json()["error"]["code"] == "service_unavailable"
        assert "Traceback" not in response.text
    ready = down_client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "unreachable"
    assert down_client.get("/livez").status_code == 200
    assert down_client.get("/metrics").status_code == 200


def test_metrics(client: TestClient) -> None:
    job = client.post("/v1/syntheses", json=SYNTHESIS).json()
    client.get(f"/v1/jobs/{job['id']}")
    client.get("/v1/jobs/nope")
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'masactrl_jobs_submitted_total{kind="synthesis",model="sd15"} 1.0' in text
    assert 'masactrl_queue_depth{model="sd15"} 1.0' in text
    assert 'masactrl_queue_depth{model="sdxl"} 0.0' in text
    # Route templates, not raw paths: ids never become label values.
    assert 'route="/v1/jobs/{job_id}",status="200"' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert 'route="unmatched",status="404"' in text
    assert job["id"] not in text
    assert 'masactrl_http_request_duration_seconds_bucket{le="0.05",method="POST"' in text


def test_models_with_live_workers(client: TestClient, redis_url: str) -> None:
    models = client.get("/v1/models").json()
    assert models["default"] == "sd15"
    sd15 = models["data"][0]
    assert sd15 == {
        "name": "sd15",
        "family": "sd",
        "native_width": 512,
        "native_height": 512,
        "block_count": 16,
        "size_multiple": 64,
        "max_pixels": 1048576,
        "default_control": {"start_step": 4, "start_layer": 10},
        "shape_source": "catalog",
        "prediction_type": None,
        "live": False,
        "preview_decoder": "vae",
        "conditions": [],
        "loras": [],
        "features": {
            "layout_conditions": True,
            "sequences": True,
            "automatic_masks": True,
            "negative_prompt": True,
            "unavailable": None,
        },
    }
    store = JobStore.from_url(redis_url)
    store.register_worker("sdxl", "gpu-0", ttl=30)
    store.close()
    live = {m["name"]: m["live"] for m in client.get("/v1/models").json()["data"]}
    assert live == {"sd15": False, "sdxl": True}


def test_the_gateway_validates_against_the_shape_a_live_worker_measured(
    client: TestClient, redis_url: str
) -> None:
    # Before any worker reports, sd15 is assumed shaped like SD 1.5: 16 blocks.
    assert client.post("/v1/syntheses", json=_with_layer(12)).status_code == 202
    pruned = {"family": "sd", "block_count": 7, "native_width": 512, "native_height": 512}
    pruned |= {"size_multiple": 32, "prediction_type": "v_prediction"}
    store = JobStore.from_url(redis_url)
    store.register_worker("sd15", "gpu-0", 30, json.dumps(pruned))
    store.close()
    sd15 = client.get("/v1/models").json()["data"][0]
    assert (sd15["shape_source"], sd15["prediction_type"]) == ("measured", "v_prediction")
    assert (sd15["block_count"], sd15["size_multiple"]) == (7, 32)
    assert sd15["default_control"] == {"start_step": 4, "start_layer": 4}
    refused = client.post("/v1/syntheses", json=_with_layer(12))
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["message"] == (
        "start_layer must be less than 7 (sd15 has 7 transformer blocks), got 12"
    )
    job = client.post("/v1/syntheses", json={**SYNTHESIS, "width": 544}).json()
    assert (job["input"]["control"]["start_layer"], job["input"]["width"]) == (4, 544)


def _with_layer(layer: int) -> dict[str, Any]:
    return {**SYNTHESIS, "control": {"start_layer": layer}}


def test_the_startup_heap_is_out_of_garbage_collection_while_serving(
    settings: GatewaySettings,
) -> None:
    with TestClient(create_app(settings)) as client:
        submitted = client.post("/v1/syntheses", json=SYNTHESIS, headers=bearer(ACME_KEY))
        assert submitted.status_code == 202
        assert gc.get_freeze_count() > 10_000  # modules, schemas, Celery's template, ...
    assert gc.get_freeze_count() == 0  # a stopped app hands everything back to the collector


def test_catalog_from_settings(make_settings: Callable[..., GatewaySettings], make_client) -> None:
    tiny = {"name": "tiny", "source": "/models/tiny", "family": "sd", "size_multiple": 8}
    catalog = {"default": "tiny", "models": [{**tiny, "native_width": 64, "native_height": 64}]}
    client = make_client(make_settings(catalog=json.dumps(catalog)))
    job = client.post("/v1/syntheses", json={**SYNTHESIS, "width": 72}).json()
    assert job["model"] == "tiny" and (job["input"]["width"], job["input"]["height"]) == (72, 64)
    assert client.post("/v1/syntheses", json={**SYNTHESIS, "model": "sd15"}).status_code == 422


def test_unknown_paths_and_methods_use_the_error_body(client: TestClient) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = client.delete("/v1/syntheses")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


# --- the contract -----------------------------------------------------------------------------


def test_committed_openapi_matches_the_served_schema(client: TestClient) -> None:
    served = client.get("/openapi.json").json()
    committed = json.loads(COMMITTED.read_text())
    assert served == committed, (
        "openapi/openapi.json is stale; regenerate it with "
        "`python -m service.openapi > openapi/openapi.json`"
    )
    assert COMMITTED.read_text() == render(openapi_document())
    # The rules' words are generated (tests/service/test_contract.py holds them to the checks):
    # the committed document states the default catalog's models as the resolver sees them.
    for path in ("/v1/syntheses", "/v1/edits", "/v1/sequences"):
        description = committed["paths"][path]["post"]["description"]
        assert models_table(default_catalog()) in description
        for entry in default_catalog().models:
            row = next(line for line in description.splitlines() if f"`{entry.name}`" in line)
            assert f"| {entry.size_multiple} | {entry.block_count} |" in row
            assert f"| {entry.default_start_layer} | {entry.max_pixels} |" in row
        assert "multiples of 8" not in description


def test_operation_ids_are_readable_and_stable() -> None:
    document = json.loads(COMMITTED.read_text())
    ids = {
        f"{method.upper()} {path}": op["operationId"]
        for path, ops in document["paths"].items()
        for method, op in ops.items()
    }
    assert ids == {
        "POST /v1/edits": "createEdit",
        "POST /v1/syntheses": "createSynthesis",
        "POST /v1/sequences": "createSequence",
        "GET /v1/jobs": "listJobs",
        "GET /v1/jobs/{job_id}": "getJob",
        "POST /v1/jobs/{job_id}/cancel": "cancelJob",
        "POST /v1/jobs/{job_id}/retry": "retryJob",
        "GET /v1/jobs/{job_id}/events": "streamJobEvents",
        "GET /v1/models": "listModels",
        "GET /v1/files/{key}": "downloadFile",
        "GET /livez": "livez",
        "GET /readyz": "readyz",
        "GET /metrics": "metrics",
    }
    edit_body = document["paths"]["/v1/edits"]["post"]["requestBody"]["content"]
    assert set(edit_body) == {"application/json", "multipart/form-data"}


def test_importing_the_gateway_does_not_import_torch() -> None:
    code = (
        "import sys, service.main, service.openapi, masactrl_cli.serve\n"
        "service.openapi.openapi_document()\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'masactrl_core')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --- settings ---------------------------------------------------------------------------------

STRONG_WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def production(**overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "_env_file": None,
        "environment": "production",
        "url_signing_secret": SIGNING_SECRET,
        "api_keys": [{"sha256": sha256_hex("k"), "tenant": "acme", "webhook_secret": STRONG_WHSEC}],
    }
    values.update(overrides)
    return GatewaySettings(**values)


def test_production_settings_accept_a_complete_configuration() -> None:
    settings = production()
    assert settings.tenants_by_key_hash()[sha256_hex("k")].name == "acme"


def key(**fields: object) -> list[dict[str, object]]:
    """A one-entry MASACTRL_API_KEYS list; ``fields`` replace the valid defaults."""
    return [{"sha256": sha256_hex("k"), "tenant": "a", "webhook_secret": STRONG_WHSEC, **fields}]


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"url_signing_secret": None}, "URL_SIGNING_SECRET"),
        ({"url_signing_secret": "changethis-changethis-changethis-1"}, "placeholder"),
        ({"dev_api_key": "dev"}, "development only"),
        ({"api_keys": []}, "no API key"),
        ({"api_keys": key(sha256="change-me")}, "SHA-256"),
        ({"api_keys": key(webhook_secret="change-me")}, "whsec_"),
        ({"api_keys": key(webhook_secret="whsec_c2hvcnQ=")}, "random bytes"),
        ({"api_keys": key(tenant="a b")}, "tenant"),
        ({"api_keys": key() * 2}, "twice"),
        ({"allow_loopback_http": True}, "ALLOW_LOOPBACK_HTTP"),
    ],
)
def test_production_refuses_unsafe_settings(overrides: dict[str, object], phrase: str) -> None:
    with pytest.raises(ValidationError, match=phrase):
        production(**overrides)


def test_development_mode_may_run_with_one_key() -> None:
    settings = GatewaySettings(_env_file=None, environment="development", dev_api_key="local")
    (tenant,) = settings.tenants_by_key_hash().values()
    assert tenant.name == "dev" and tenant.webhook_secrets[0].startswith("whsec_")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [ApiKeyConfig(sha256=sha256_hex("k"), tenant="acme", webhook_secret=STRONG_WHSEC)]
    monkeypatch.setenv(
        "MASACTRL_API_KEYS",
        json.dumps([k.model_dump(mode="json") | {"webhook_secret": STRONG_WHSEC} for k in keys]),
    )
    monkeypatch.setenv("MASACTRL_URL_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("MASACTRL_MAX_QUEUE_DEPTH", "7")
    settings = GatewaySettings(_env_file=None)
    assert settings.max_queue_depth == 7 and settings.environment == "production"
    assert settings.api_keys[0].tenant == "acme"


# --- masactrl serve ---------------------------------------------------------------------------


def test_serve_refuses_bad_configuration_with_one_message(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MASACTRL_ENVIRONMENT": "production"}
    code = (
        "import argparse, sys\n"
        "from masactrl_cli import serve\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='command')\n"
        "serve.add_parser(sub)\n"
        "try:\n"
        "    serve.run(p.parse_args(['serve', '--port', '0']))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "MASACTRL_URL_SIGNING_SECRET" in result.stdout + result.stderr
