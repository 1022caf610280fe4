"""Layout conditions and anchored edits at the gateway: catalog names, 422s, stored inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from masactrl_jobs.schema import MAX_TARGETS
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
                "canny": {"source": "lllyasviel/sd-controlnet-canny", "kind": "controlnet"},
                "depth": {"source": "org/t2iadapter-depth-sd15", "kind": "t2i_adapter"},
            },
        },
        "sdxl": {"source": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl"},
    },
}


@pytest.fixture()
def settings(make_settings: Callable[..., GatewaySettings]) -> GatewaySettings:
    return make_settings(catalog=json.dumps(CATALOG))


def _edit(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": data_url(png_bytes()),
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a cat in a hat", "a dog"],
    }
    body.update(overrides)
    return body


def _condition(**overrides: Any) -> dict[str, Any]:
    return {"model": "canny", "images": [data_url(png_bytes(color=(255, 255, 255)))], **overrides}


def test_models_list_their_condition_models(client: TestClient) -> None:
    models = {model["name"]: model for model in client.get("/v1/models").json()["data"]}
    assert models["sd15"]["conditions"] == [
        {"name": "canny", "kind": "controlnet", "family": "sd"},
        {"name": "depth", "kind": "t2i_adapter", "family": "sd"},
    ]
    assert models["sdxl"]["conditions"] == []


def test_a_conditioned_anchored_edit_is_accepted_with_stored_images(
    client: TestClient, settings: GatewaySettings, redis_client: redis.Redis
) -> None:
    body = _edit(
        condition=_condition(scale=0.8, start=0.1, end=0.9, preprocess="canny"),
        anchor_source=True,
    )
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    condition = job["input"]["condition"]
    assert job["input"]["anchor_source"] is True
    assert (condition["model"], condition["scale"], condition["start"], condition["end"]) == (
        "canny",
        0.8,
        0.1,
        0.9,
    )
    assert condition["preprocess"] == "canny" and condition["source_image"] is None
    [key] = condition["images"]
    assert key.startswith("inputs/")
    assert (Path(settings.storage_url.removeprefix("file://")) / key).is_file()
    assert broker_messages(redis_client, "masactrl.sd15") == [("masactrl.run_job", [job["id"]])]


def test_a_synthesis_may_condition_its_source_with_one_image_per_target(
    client: TestClient,
) -> None:
    image = data_url(png_bytes(color=(0, 0, 0)))
    body = {
        **SYNTHESIS,
        "target_prompts": ["a", "b"],
        "condition": _condition(images=[image, image], source_image=image),
    }
    response = client.post("/v1/syntheses", json=body)
    assert response.status_code == 202, response.text
    condition = response.json()["input"]["condition"]
    assert len(condition["images"]) == 2 and condition["source_image"].startswith("inputs/")
    assert response.json()["input"]["anchor_source"] is False


def test_a_multipart_edit_carries_the_condition_in_its_params(client: TestClient) -> None:
    params = {"target_prompts": ["a dog"], "condition": _condition(), "anchor_source": True}
    response = client.post(
        "/v1/edits",
        files={"image": ("photo.png", png_bytes(), "image/png")},
        data={"params": json.dumps(params)},
    )
    assert response.status_code == 202, response.text
    assert response.json()["input"]["condition"]["images"][0].startswith("inputs/")
    assert response.json()["input"]["anchor_source"] is True


def _image() -> str:
    return data_url(png_bytes())


BAD = [
    ("unknown condition model", {"condition": _condition(model="pose")}, ["model"], "no condition"),
    (
        "count neither 1 nor targets",
        {"condition": _condition(images=[_image()] * 3)},
        ["images"],
        "one condition image per target prompt (2)",
    ),
    (
        "source image on an edit",
        {"condition": _condition(source_image=_image())},
        ["source_image"],
        "an edit takes no source condition image",
    ),
    ("start equals end", {"condition": _condition(start=0.5, end=0.5)}, ["end"], "less than end"),
    ("start after end", {"condition": _condition(start=0.7, end=0.2)}, ["end"], "less than end"),
    ("start below 0", {"condition": _condition(start=-0.5)}, ["start"], "within [0, 1]"),
    ("end above 1", {"condition": _condition(end=1.5)}, ["end"], "within [0, 1]"),
    ("negative scale", {"condition": _condition(scale=-1)}, ["scale"], "not be negative"),
    ("unknown preprocess", {"condition": _condition(preprocess="depth")}, ["preprocess"], "canny"),
    ("no images", {"condition": _condition(images=[])}, ["images"], "at least 1"),
    ("no model", {"condition": {"images": [_image()]}}, ["model"], "required"),
    ("bad image reference", {"condition": _condition(images=["nope"])}, ["images", 0], "data:"),
]


@pytest.mark.parametrize(("case", "patch", "loc", "message"), BAD, ids=[case[0] for case in BAD])
def test_bad_conditions_are_422_with_the_field(
    client: TestClient,
    redis_client: redis.Redis,
    case: str,
    patch: dict[str, Any],
    loc: list[Any],
    message: str,
) -> None:
    response = client.post("/v1/edits", json=_edit(**patch))
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert details[0]["loc"] == ["body", "condition", *loc], details
    assert message in details[0]["message"], details
    assert broker_messages(redis_client, "masactrl.sd15") == []


def test_a_condition_for_a_model_without_any_is_422(client: TestClient) -> None:
    response = client.post("/v1/edits", json=_edit(model="sdxl", condition=_condition()))
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == ["body", "condition", "model"]
    assert detail["message"] == "sdxl has no condition model 'canny'; available: none"
    assert detail["type"] == "unknown_condition"


def test_anchor_source_is_for_edits_only(client: TestClient) -> None:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, "anchor_source": True})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "anchor_source"]


# --- condition images as multipart file parts --------------------------------------------------

BLACK, WHITE = png_bytes(color=(0, 0, 0)), png_bytes(color=(255, 255, 255))


def _multipart_edit(
    client: TestClient,
    condition: dict[str, Any] | None,
    parts: list[bytes],
    **headers: str,
) -> Any:
    params: dict[str, Any] = {"target_prompts": ["a cat in a hat", "a dog"]}
    if condition is not None:
        params["condition"] = condition
    files = [("image", ("photo.png", png_bytes(), "image/png"))]
    files += [("condition_image", (f"c{i}.png", p, "image/png")) for i, p in enumerate(parts)]
    return client.post(
        "/v1/edits", files=files, data={"params": json.dumps(params)}, headers=headers
    )


def test_condition_images_as_file_parts_are_stored_in_order(
    client: TestClient, settings: GatewaySettings
) -> None:
    response = _multipart_edit(client, {"model": "canny", "scale": 0.5}, [BLACK, WHITE])
    assert response.status_code == 202, response.text
    condition = response.json()["input"]["condition"]
    assert condition["scale"] == 0.5
    # The same images as references in a JSON edit resolve to the same keys, in the same order.
    as_json = _edit(condition=_condition(images=[data_url(BLACK), data_url(WHITE)]))
    expected = client.post("/v1/edits", json=as_json).json()["input"]["condition"]["images"]
    assert condition["images"] == expected and expected[0] != expected[1]
    root = Path(settings.storage_url.removeprefix("file://"))
    assert all((root / key).is_file() for key in condition["images"])


@pytest.mark.parametrize(
    ("condition", "parts", "loc", "message"),
    [
        (_condition(), [WHITE], ["body", "params", "condition", "images"], "not both"),
        (None, [WHITE], ["body", "params", "condition"], "need a condition"),
        ({"model": "canny"}, [WHITE, b"not an image"], ["body", "condition_image", 1], ""),
        ({"model": "canny"}, [WHITE] * 3, ["body", "condition_image"], "per target"),
        ({"model": "canny"}, [], ["body", "params", "condition", "images"], ""),
    ],
    ids=["part and list", "no condition", "not an image", "count", "neither"],
)
def test_bad_condition_parts_are_422_naming_the_field(
    client: TestClient,
    settings: GatewaySettings,
    condition: dict[str, Any] | None,
    parts: list[bytes],
    loc: list[Any],
    message: str,
) -> None:
    root = Path(settings.storage_url.removeprefix("file://"))
    before = sorted(root.rglob("*"))
    response = _multipart_edit(client, condition, parts)
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == loc and message in detail["message"]
    assert sorted(root.rglob("*")) == before  # a refused request stores nothing


def test_a_condition_part_over_the_image_limit_is_422(
    make_settings: Callable[..., GatewaySettings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(catalog=json.dumps(CATALOG), max_image_bytes=4096))
    big = b"\x89PNG" + b"x" * 5000
    response = _multipart_edit(client, {"model": "canny"}, [WHITE, big])
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert (
        detail["loc"] == ["body", "condition_image", 1] and "condition image" in detail["message"]
    )


def test_an_idempotent_multipart_edit_tells_its_condition_parts_apart(client: TestClient) -> None:
    condition = {"model": "canny"}
    first = _multipart_edit(client, condition, [BLACK], **{"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    replay = _multipart_edit(client, condition, [BLACK], **{"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    other = _multipart_edit(client, condition, [WHITE], **{"Idempotency-Key": "k1"})
    assert other.status_code == 422
    assert other.json()["error"]["details"][0]["type"] == "idempotency_key_reused"


def test_the_most_condition_parts_fit_with_params_sent_as_a_file(client: TestClient) -> None:
    params = {"target_prompts": ["a dog"] * MAX_TARGETS, "condition": {"model": "canny"}}
    files = [("image", ("photo.png", png_bytes(), "image/png"))]
    files += [("condition_image", ("c.png", WHITE, "image/png"))] * MAX_TARGETS
    files += [("params", ("params.json", json.dumps(params).encode(), "application/json"))]
    response = client.post("/v1/edits", files=files)
    assert response.status_code == 202, response.text
    assert len(response.json()["input"]["condition"]["images"]) == MAX_TARGETS


def test_a_second_image_part_is_422(client: TestClient) -> None:
    photo = ("image", ("photo.png", png_bytes(), "image/png"))
    response = client.post(
        "/v1/edits", files=[photo, photo], data={"params": '{"target_prompts": ["a dog"]}'}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "image"]
