"""LoRA adapters at the gateway: listed by GET /v1/models, unknown names 422, weights resolved."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import GatewaySettings
from tests.images import data_url, png_bytes

CATALOG = {
    "default": "anything",
    "models": {
        "anything": {
            "source": "/models/anything-v4.5.safetensors",
            "family": "sd",
            "config": "/models/configs/sd15",
            "loras": {
                "watercolor": {"source": "/models/loras/watercolor.safetensors", "weight": 0.8},
                "ink": {"source": "/models/loras/ink"},
            },
        },
        "sdxl": {"source": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl"},
    },
}
SYNTHESIS = {"source_prompt": "a cat sitting", "target_prompts": ["a cat running"], "steps": 10}


@pytest.fixture()
def settings(make_settings: Callable[..., GatewaySettings]) -> GatewaySettings:
    return make_settings(catalog=json.dumps(CATALOG))


def test_models_list_their_adapters(client: TestClient) -> None:
    models = {model["name"]: model for model in client.get("/v1/models").json()["data"]}
    assert models["anything"]["loras"] == [
        {"name": "ink", "weight": 1.0},
        {"name": "watercolor", "weight": 0.8},
    ]
    assert models["sdxl"]["loras"] == []


def test_a_job_with_adapters_stores_their_resolved_weights(client: TestClient) -> None:
    body = {**SYNTHESIS, "loras": [{"name": "watercolor"}, {"name": "ink", "weight": -0.5}]}
    response = client.post("/v1/syntheses", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["loras"] == [
        {"name": "watercolor", "weight": 0.8},
        {"name": "ink", "weight": -0.5},
    ]
    plain = client.post("/v1/syntheses", json=SYNTHESIS).json()
    assert plain["input"]["loras"] == []


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/syntheses", {}),
        ("/v1/edits", {"image": data_url(png_bytes())}),
    ],
)
def test_an_unknown_adapter_is_a_422_with_its_field_path(
    client: TestClient, path: str, extra: dict[str, Any]
) -> None:
    body = {**SYNTHESIS, **extra, "loras": [{"name": "ink"}, {"name": "oil"}]}
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"] == (
        "loras.1.name: anything has no LoRA adapter 'oil'; available: ink, watercolor"
    )
    assert error["details"][0]["loc"] == ["body", "loras", 1, "name"]


def test_an_adapter_of_another_model_is_refused(client: TestClient) -> None:
    body = {**SYNTHESIS, "model": "sdxl", "loras": [{"name": "ink"}]}
    response = client.post("/v1/syntheses", json=body)
    assert response.status_code == 422
    assert "sdxl has no LoRA adapter 'ink'; available: none" in response.json()["error"]["message"]


def test_too_many_or_repeated_adapters_are_422(client: TestClient) -> None:
    five = [{"name": "ink"}] * 5
    assert client.post("/v1/syntheses", json={**SYNTHESIS, "loras": five}).status_code == 422
    twice = [{"name": "ink"}, {"name": "ink"}]
    response = client.post("/v1/syntheses", json={**SYNTHESIS, "loras": twice})
    assert response.status_code == 422
    assert "repeated: ink" in response.json()["error"]["message"]
