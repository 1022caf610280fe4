"""SD3 and FLUX.1 catalog models at the gateway: what `GET /v1/models` says about their
features, and the 422s for what their families do not offer (layout conditions, sequences, a
negative prompt on guidance-distilled FLUX.1). The gateway loads no model, so hub ids will do."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.config import GatewaySettings
from tests.images import data_url, png_bytes
from tests.service.conftest import SYNTHESIS, broker_messages

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
        "flux-dev": {"source": "black-forest-labs/FLUX.1-dev", "family": "flux"},
        "sd3": {"source": "stabilityai/stable-diffusion-3-medium-diffusers", "family": "sd3"},
    },
}


@pytest.fixture()
def settings(make_settings: Callable[..., GatewaySettings]) -> GatewaySettings:
    return make_settings(catalog=json.dumps(CATALOG))


def _condition() -> dict[str, Any]:
    return {"model": "canny", "images": [data_url(png_bytes(color=(255, 255, 255)))]}


def _detail(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert len(details) == 1, details
    detail: dict[str, Any] = details[0]
    return detail


def test_models_report_the_family_and_its_features(client: TestClient) -> None:
    models = {model["name"]: model for model in client.get("/v1/models").json()["data"]}
    flux, sd3, sd15 = models["flux-dev"], models["sd3"], models["sd15"]
    assert (flux["family"], sd3["family"]) == ("flux", "sd3")
    assert flux["features"]["layout_conditions"] is False
    assert flux["features"]["sequences"] is False
    assert flux["features"]["negative_prompt"] is False
    assert "not available on FLUX.1" in flux["features"]["unavailable"]
    assert sd3["features"]["negative_prompt"] is True
    assert sd3["features"]["sequences"] is False
    assert flux["features"]["automatic_masks"] is False
    assert sd15["features"] == {
        "layout_conditions": True,
        "sequences": True,
        "automatic_masks": True,
        "negative_prompt": True,
        "unavailable": None,
    }
    # The family's reference shape until a worker reports: FLUX.1 [dev]'s 19 + 38 blocks.
    assert (flux["block_count"], flux["size_multiple"], flux["native_width"]) == (57, 16, 1024)
    assert (sd3["block_count"], sd3["size_multiple"]) == (24, 16)


@pytest.mark.parametrize("route", ["/v1/syntheses", "/v1/edits"])
@pytest.mark.parametrize("model", ["flux-dev", "sd3"])
def test_a_condition_on_an_mmdit_model_is_422_at_the_condition(
    client: TestClient, redis_client: redis.Redis, route: str, model: str
) -> None:
    body: dict[str, Any] = {**SYNTHESIS, "model": model, "condition": _condition()}
    if route == "/v1/edits":
        body["image"] = data_url(png_bytes())
    detail = _detail(client.post(route, json=body))
    assert detail["loc"] == ["body", "condition"]
    assert detail["type"] == "unsupported_feature"
    assert detail["message"].startswith(f"{model} is a ")
    assert "layout conditions and sequences are not available" in detail["message"]
    assert broker_messages(redis_client, f"masactrl.{model}") == []


@pytest.mark.parametrize("model", ["flux-dev", "sd3"])
def test_a_sequence_on_an_mmdit_model_is_422_at_the_model(client: TestClient, model: str) -> None:
    body = {
        "model": model,
        "source_prompt": "a photo of a dancer",
        "target_prompts": ["a photo of a dancer, moving"],
        "condition": {"model": "canny", "frames": [data_url(png_bytes())] * 2},
    }
    detail = _detail(client.post("/v1/sequences", json=body))
    assert detail["loc"] == ["body", "model"]
    assert detail["type"] == "unsupported_feature"


def test_a_negative_prompt_on_flux_is_422_and_on_sd3_is_queued(
    client: TestClient, redis_client: redis.Redis
) -> None:
    body = {**SYNTHESIS, "negative_prompt": "blurry"}
    detail = _detail(client.post("/v1/syntheses", json={**body, "model": "flux-dev"}))
    assert detail["loc"] == ["body", "negative_prompt"]
    assert "guidance-distilled" in detail["message"]
    accepted = client.post("/v1/syntheses", json={**body, "model": "sd3"})
    assert accepted.status_code == 202, accepted.text
    assert len(broker_messages(redis_client, "masactrl.sd3")) == 1


def test_automatic_masks_on_flux_are_422_and_drawn_ones_are_queued(
    client: TestClient, redis_client: redis.Redis
) -> None:
    auto = {"mode": "auto", "source_word": "cat", "target_word": "cat"}
    body = {**SYNTHESIS, "model": "flux-dev", "control": {"mask": auto}}
    detail = _detail(client.post("/v1/syntheses", json=body))
    assert detail["loc"] == ["body", "control", "mask", "mode"]
    assert "draw the regions" in detail["message"]
    white = data_url(png_bytes(color=(255, 255, 255)))
    manual = {"mode": "manual", "regions": [{"source": white, "target": white}]}
    body["control"] = {"mask": manual}
    assert client.post("/v1/syntheses", json=body).status_code == 202
    assert len(broker_messages(redis_client, "masactrl.flux-dev")) == 1


def test_a_plain_flux_synthesis_is_queued_with_the_reference_shape(
    client: TestClient, redis_client: redis.Redis
) -> None:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, "model": "flux-dev"})
    assert response.status_code == 202, response.text
    job = response.json()
    queued = broker_messages(redis_client, "masactrl.flux-dev")
    assert queued == [("masactrl.run_job", [job["id"]])]
    assert (job["input"]["width"], job["input"]["height"]) == (1024, 1024)
    # FLUX.1 [dev]'s own default until a worker reports: its first single-stream block.
    assert job["input"]["control"]["start_layer"] == 19
    assert job["input"]["control"]["start_step"] == 4


def test_the_contract_states_the_family_rules(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    synthesis = paths["/v1/syntheses"]["post"]["description"]
    assert "`condition`: only on a model whose family takes layout conditions" in synthesis
    assert "`negative_prompt`: empty on a guidance-distilled model" in synthesis
    assert "| `flux-dev` | flux |" in synthesis
    assert (
        "`model`: a model whose family runs sequences"
        in paths["/v1/sequences"]["post"]["description"]
    )
