"""The submission dispatches through the kinds' registry: each route's job reaches its kind.

What each kind checks and resolves is tested with the kind (tests/masactrl_jobs/test_kinds.py)
and through the routes (test_submit.py, test_sequences.py, test_conditions.py); here the
gateway's one submission path is shown to call the registered kind's handlers, in order.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from masactrl_jobs.kinds import KINDS
from masactrl_jobs.schema import JobKind
from service.config import GatewaySettings
from tests.images import data_url, png_bytes

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
    },
}
IMAGE = data_url(png_bytes())
REQUESTS: dict[JobKind, tuple[str, dict[str, Any]]] = {
    JobKind.edit: ("/v1/edits", {"image": IMAGE, "target_prompts": ["a dog"]}),
    JobKind.synthesis: ("/v1/syntheses", {"source_prompt": "a cat", "target_prompts": ["a dog"]}),
    JobKind.sequence: (
        "/v1/sequences",
        {
            "source_prompt": "a cat",
            "target_prompts": ["a dog"],
            "condition": {"model": "canny", "frames": [IMAGE, IMAGE]},
        },
    ),
}
HANDLERS = ("check", "takes_inputs", "read_inputs", "resolve")


def _spy(name: str, handler: Any, seen: list[str]) -> Any:
    if inspect.iscoroutinefunction(handler):

        async def spied_async(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return await handler(*args, **kwargs)

        return spied_async

    def spied(*args: Any, **kwargs: Any) -> Any:
        seen.append(name)
        return handler(*args, **kwargs)

    return spied


@pytest.mark.parametrize("job_kind", list(JobKind))
def test_each_route_submits_through_its_registered_kind(
    job_kind: JobKind,
    make_settings: Callable[..., GatewaySettings],
    make_client: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: dict[JobKind, list[str]] = {kind: [] for kind in KINDS}
    for kind, spec in KINDS.items():
        for name in HANDLERS:
            monkeypatch.setattr(spec, name, _spy(name, getattr(spec, name), calls[kind]))
    client = make_client(make_settings(catalog=json.dumps(CATALOG)))
    path, body = REQUESTS[job_kind]
    response = client.post(path, json=body)
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == job_kind.value
    # Synthesis without mask or condition images has no inputs to read.
    reads = job_kind is not JobKind.synthesis
    assert calls.pop(job_kind) == ["check", "takes_inputs", *(["read_inputs"] * reads), "resolve"]
    assert all(not seen for seen in calls.values())  # no other kind was asked


def test_a_kinds_issues_become_the_422_with_their_field_paths(
    make_settings: Callable[..., GatewaySettings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(catalog=json.dumps(CATALOG)))
    path, body = REQUESTS[JobKind.sequence]
    response = client.post(path, json={**body, "anchor_source": True})
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {
            "loc": ["body", "anchor_source"],
            "message": "anchor_source needs an image as the source",
            "type": "value_error",
        }
    ]
