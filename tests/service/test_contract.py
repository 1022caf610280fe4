"""The submission routes' rules in words (service/api/contract.py) against the checks they describe.

The OpenAPI text is generated from the rules the checks declare and from the app's catalog; these
tests hold the words to the behaviour: every rule a kind lists is broken once through the gateway
and must be refused on a field the rule names, and the model values the text prints (its table)
are the ones the gateway enforces. tests/service/test_ops.py keeps openapi/openapi.json current.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from masactrl_jobs.control import (
    CONDITION_IMAGES_RULE,
    CONDITION_SCALE_RULE,
    CONDITION_SOURCE_IMAGE_RULE,
    CONDITION_WINDOW_RULE,
    CONTROL_LAYERS_RULE,
    CONTROL_STEPS_RULE,
    LORA_NAME_RULE,
    MAX_PIXELS_RULE,
    SEQUENCE_FRAME_COUNT_RULE,
    SEQUENCE_FRAMES_RULE,
    SEQUENCE_MAX_FRAMES_RULE,
    SEQUENCE_PROMPTS_RULE,
    SEQUENCE_SAMPLING_RULE,
    SIZE_MULTIPLE_RULE,
    START_STEP_RULE,
    Rule,
)
from masactrl_jobs.kinds import KINDS
from masactrl_jobs.kinds.base import (
    AUTOMATIC_MASK_RULE,
    CONDITION_FAMILY_RULE,
    CONDITION_MODEL_RULE,
    NEGATIVE_PROMPT_RULE,
)
from masactrl_jobs.kinds.sequence import (
    SEQUENCE_FAMILY_RULE,
    SIZE_LIMIT_RULE,
    SOURCE_RULES,
    VIDEO_BUDGET_RULE,
)
from masactrl_jobs.kinds.stills import MASK_RULES
from masactrl_jobs.schema import JobKind
from service.config import GatewaySettings
from tests.images import data_url, png_bytes
from tests.videos import blank_video

CATALOG = {
    "default": "sd15",
    "models": {
        "sd15": {
            "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "family": "sd",
            "conditions": {
                "canny": {"source": "lllyasviel/sd-controlnet-canny", "kind": "controlnet"}
            },
            "loras": {"ink": {"source": "/models/loras/ink.safetensors"}},
        },
        "sdxl": {"source": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl"},
        # A pruned SD checkpoint, as its catalog entry declares it.
        "small": {
            "source": "/models/small-sd",
            "family": "sd",
            "block_count": 7,
            "size_multiple": 32,
        },
        # An MM-DiT: no layout conditions, no sequences, no negative prompt (guidance-distilled).
        "flux": {"source": "black-forest-labs/FLUX.1-dev", "family": "flux"},
    },
}
ROUTES = {
    JobKind.synthesis: "/v1/syntheses",
    JobKind.edit: "/v1/edits",
    JobKind.sequence: "/v1/sequences",
}
IMAGE = data_url(png_bytes())
PROMPTS = {"source_prompt": "a photo of a cat", "target_prompts": ["a photo of a running cat"]}
BODIES: dict[JobKind, dict[str, Any]] = {
    JobKind.synthesis: {**PROMPTS, "steps": 10},
    JobKind.edit: {**PROMPTS, "image": IMAGE, "steps": 10},
    JobKind.sequence: {
        **PROMPTS,
        "condition": {"model": "canny", "frames": [IMAGE] * 3},
        "steps": 10,
    },
}


def _noise() -> str:
    # Random pixels do not compress: a PNG of some 12 KB.
    data = random.Random(0).randbytes(64 * 64 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), data).save(buffer, format="PNG")
    return data_url(buffer.getvalue())


def _video(side: int) -> str:
    return data_url(blank_video(side, side, 2), "video/mp4")


def _condition(**values: Any) -> dict[str, Any]:
    return {"condition": {"model": "canny", "images": [IMAGE], **values}}


def _frames(count: int, **values: Any) -> dict[str, Any]:
    return {"condition": {"model": "canny", "frames": [IMAGE] * count, **values}}


@dataclass(frozen=True)
class Broken:
    """A request of ``kind`` that breaks ``rule`` alone (with ``settings`` overridden)."""

    kind: JobKind
    rule: Rule
    patch: dict[str, Any]
    status: int = 422
    settings: dict[str, Any] = field(default_factory=dict)


S, E, Q = JobKind.synthesis, JobKind.edit, JobKind.sequence
MANUAL, AUTO = {"mode": "manual"}, {"mode": "auto"}
BROKEN = [
    Broken(S, SIZE_MULTIPLE_RULE, {"width": 520}),  # a multiple of 8, as the old text said
    Broken(E, SIZE_MULTIPLE_RULE, {"height": 520}),
    Broken(S, MAX_PIXELS_RULE, {"width": 2048, "height": 1024}),
    Broken(S, MAX_PIXELS_RULE, {"height": 2560}),
    Broken(S, START_STEP_RULE, {"control": {"start_step": 11}}),
    Broken(Q, START_STEP_RULE, {"control": {"start_step": 11}}),
    Broken(Q, SIZE_MULTIPLE_RULE, {"width": 520}),
    Broken(Q, MAX_PIXELS_RULE, {"width": 2048, "height": 1024}),
    Broken(Q, CONTROL_STEPS_RULE, {"control": {"steps": [10]}}),
    Broken(Q, CONTROL_LAYERS_RULE, {"control": {"start_layer": 16}}),
    Broken(Q, LORA_NAME_RULE, {"loras": [{"name": "watercolor"}]}),
    Broken(S, CONTROL_STEPS_RULE, {"control": {"steps": [3, 10]}}),
    Broken(S, CONTROL_LAYERS_RULE, {"control": {"start_layer": 16}}),
    Broken(E, CONTROL_LAYERS_RULE, {"control": {"layers": [9, 16]}}),
    Broken(S, LORA_NAME_RULE, {"loras": [{"name": "ink"}, {"name": "watercolor"}]}),
    Broken(S, MASK_RULES[0], {"control": {"mask": MANUAL}}),
    Broken(
        S, MASK_RULES[0], {"control": {"mask": {"regions": [{"source": IMAGE, "target": IMAGE}]}}}
    ),
    Broken(
        S,
        MASK_RULES[1],
        {"control": {"mask": {**AUTO, "source_word": "dog", "target_word": "cat"}}},
    ),
    Broken(S, MASK_RULES[1], {"control": {"mask": {"source_word": "cat"}}}),
    Broken(
        E,
        MASK_RULES[2],
        {"control": {"mask": {**AUTO, "source_word": "cat", "target_word": "dog"}}},
    ),
    Broken(S, CONDITION_MODEL_RULE, {"condition": {"model": "pose", "images": [IMAGE]}}),
    Broken(Q, CONDITION_MODEL_RULE, {"condition": {"model": "pose", "frames": [IMAGE]}}),
    Broken(S, CONDITION_FAMILY_RULE, {"model": "flux", **_condition()}),
    Broken(E, NEGATIVE_PROMPT_RULE, {"model": "flux", "negative_prompt": "blurry"}),
    Broken(Q, SEQUENCE_FAMILY_RULE, {"model": "flux"}),
    Broken(
        S,
        AUTOMATIC_MASK_RULE,
        {
            "model": "flux",
            "control": {"mask": {**AUTO, "source_word": "cat", "target_word": "cat"}},
        },
    ),
    Broken(
        S,
        CONDITION_IMAGES_RULE,
        {"target_prompts": ["a", "b", "c"], **_condition(images=[IMAGE] * 2)},
    ),
    Broken(E, CONDITION_SOURCE_IMAGE_RULE, _condition(source_image=IMAGE)),
    Broken(S, CONDITION_WINDOW_RULE, _condition(start=0.9, end=0.1)),
    Broken(Q, CONDITION_WINDOW_RULE, _frames(1, start=0.5, end=1.5)),
    Broken(S, CONDITION_SCALE_RULE, _condition(scale=-0.5)),
    Broken(Q, CONDITION_SCALE_RULE, _frames(1, scale=-0.5)),
    Broken(Q, SEQUENCE_FRAMES_RULE, {"condition": {"model": "canny"}}),
    Broken(Q, SEQUENCE_FRAMES_RULE, _frames(1, video="data:x")),
    Broken(Q, SEQUENCE_FRAME_COUNT_RULE, _frames(5), settings={"max_sequence_frames": 4}),
    Broken(Q, SEQUENCE_SAMPLING_RULE, _frames(1, max_frames=2)),
    Broken(
        Q,
        SEQUENCE_MAX_FRAMES_RULE,
        {"condition": {"model": "canny", "video": _video(64), "max_frames": 5}},
        settings={"max_sequence_frames": 4},
    ),
    Broken(
        Q,
        VIDEO_BUDGET_RULE,
        {"condition": {"model": "canny", "video": _video(128)}},
        settings={"max_image_side": 64},
    ),
    Broken(Q, SEQUENCE_PROMPTS_RULE, {"target_prompts": ["a", "b"]}),
    Broken(Q, SOURCE_RULES[0], {"source_prompt": " "}),
    Broken(Q, SOURCE_RULES[1], {"anchor_source": True}),
    Broken(Q, SOURCE_RULES[2], {"control": {"mask": MANUAL}}),
    Broken(
        Q,
        SIZE_LIMIT_RULE,
        {"condition": {"model": "canny", "frames": [_noise()]}},
        status=413,
        settings={"max_sequence_bytes": 1024},
    ),
]


@pytest.fixture()
def make(
    make_settings: Callable[..., GatewaySettings], make_client: Callable[..., TestClient]
) -> Callable[..., TestClient]:
    """A client of an app serving CATALOG, with settings overridden."""
    return lambda **overrides: make_client(make_settings(catalog=json.dumps(CATALOG), **overrides))


def _field(loc: list[str | int]) -> str:
    """A 422's loc as a rule names fields: ``["body", "loras", 1, "name"]`` -> ``loras[].name``."""
    assert loc[0] == "body", loc
    dotted = ""
    for part in loc[1:]:
        dotted += "[]" if isinstance(part, int) else (f".{part}" if dotted else part)
    return dotted


def _rule_line(rule: Rule) -> str:
    return "- " + ", ".join(f"`{name}`" for name in rule.fields) + ": "


def _description(client: TestClient, kind: JobKind) -> str:
    document = client.get("/openapi.json").json()
    operation = document["paths"][ROUTES[kind]]["post"]
    assert operation["x-job-kind"] == kind.value
    description: str = operation["description"]
    return description


@pytest.mark.parametrize(
    "case",
    BROKEN,
    ids=[f"{c.kind.value}-{'/'.join(c.rule.fields)}-{i}" for i, c in enumerate(BROKEN)],
)
def test_a_request_that_breaks_a_stated_rule_is_refused_on_a_field_it_names(
    make: Callable[..., TestClient], case: Broken
) -> None:
    client = make(**case.settings)
    # The route states the rule...
    assert _rule_line(case.rule) in _description(client, case.kind)
    # ...and refuses a request that breaks it, naming one of its fields and nothing else.
    response = client.post(ROUTES[case.kind], json={**BODIES[case.kind], **case.patch})
    assert response.status_code == case.status, response.text
    refused = {_field(detail["loc"]) for detail in response.json()["error"]["details"]}
    assert refused and refused <= set(case.rule.fields), (refused, case.rule)


def test_every_stated_rule_is_broken_by_a_case_above() -> None:
    stated = {(job_kind, rule) for job_kind, kind in KINDS.items() for rule in kind.rules}
    # The still kinds share their checks (kinds/stills.py): a case of either covers both.
    shared = {JobKind.edit: JobKind.synthesis, JobKind.synthesis: JobKind.edit}
    covered = {(case.kind, case.rule) for case in BROKEN}
    covered |= {(shared[case.kind], case.rule) for case in BROKEN if case.kind in shared}
    assert stated <= covered, sorted(str(rule) for rule in stated - covered)
    assert covered - stated == set(), "a case breaks a rule its kind does not state"


def _table(description: str) -> dict[str, dict[str, str]]:
    """The models table of a description: each model's row, keyed by the column headings."""
    lines = [line for line in description.splitlines() if line.startswith("| ")]
    headings = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(
            zip(headings, (cell.strip() for cell in line.strip("|").split("|")), strict=True)
        )
        rows[cells["model"].split("`")[1]] = cells
    return rows


def _poster(client: TestClient, body: dict[str, Any]) -> Callable[..., Any]:
    return lambda **values: client.post("/v1/syntheses", json={**body, **values})


def test_the_stated_model_values_are_the_enforced_ones(make: Callable[..., TestClient]) -> None:
    client = make()
    table = _table(_description(client, JobKind.synthesis))
    assert list(table) == ["sd15", "sdxl", "small", "flux"]
    assert table["small"]["size multiple"] == "32" and table["small"]["block count"] == "7"
    for model, row in table.items():
        native_width, native_height = (int(side) for side in row["native size"].split("×"))
        multiple, blocks = int(row["size multiple"]), int(row["block count"])
        post = _poster(client, {**BODIES[JobKind.synthesis], "model": model})
        job = post().json()
        assert (job["input"]["width"], job["input"]["height"]) == (native_width, native_height)
        control = job["input"]["control"]
        assert control["start_step"] == int(row["default start step"])
        assert control["start_layer"] == int(row["default start layer"])
        assert post(width=native_width + multiple).status_code == 202
        assert post(width=native_width + multiple // 2).status_code == 422
        assert post(control={"start_layer": blocks - 1}).status_code == 202
        assert post(control={"start_layer": blocks}).status_code == 422
        # The largest square within max pixels, to the multiple; then one multiple wider.
        max_pixels = int(row["max pixels"])
        side = int(max_pixels**0.5) // multiple * multiple
        assert post(width=side, height=side).status_code == 202
        width = max_pixels // side // multiple * multiple + multiple
        assert post(width=width, height=side).status_code == 422


def test_what_the_rules_allow_at_their_bounds_is_accepted(make: Callable[..., TestClient]) -> None:
    client = make()
    body = BODIES[JobKind.synthesis]
    for control in ({"start_step": 10}, {"steps": []}, {"start_step": 0, "steps": [9]}):
        response = client.post("/v1/syntheses", json={**body, "control": control})
        assert response.status_code == 202, (control, response.text)
    # A default start step past a short run is clipped, as stated.
    job = client.post("/v1/syntheses", json={**body, "steps": 3}).json()
    assert job["input"]["control"]["start_step"] == 3


def test_the_text_follows_the_apps_catalog_and_limits(
    make_settings: Callable[..., GatewaySettings], make_client: Callable[..., TestClient]
) -> None:
    tiny = {"name": "tiny", "source": "/models/tiny", "family": "sd", "size_multiple": 16}
    catalog = {"default": "tiny", "models": [{**tiny, "native_width": 64, "native_height": 64}]}
    client = make_client(make_settings(catalog=json.dumps(catalog), max_sequence_frames=9))
    description = _description(client, JobKind.sequence)
    assert list(_table(description)) == ["tiny"]
    assert _table(description)["tiny"]["size multiple"] == "16"
    assert "at most 9 frames" in description
    # The other apps of the process keep their own text (the routers are shared).
    assert "at most 4 frames" in _description(make_client(make_settings(max_sequence_frames=4)), Q)
