"""The job object written out directly for a just-created job matches the pydantic rendering."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from masactrl_jobs.kinds.synthesis import SYNTHESIS
from masactrl_jobs.schema import JobKind, JobStatus, ProgressPhase, SynthesisCreate
from masactrl_jobs.store import JobRecord, ProgressRecord


def _record(client: TestClient, **overrides: object) -> JobRecord:
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    body = SynthesisCreate.model_validate(
        {
            "source_prompt": 'a "quoted" corgi \\ on the beach \u00e9\u6f22 \n\t\x01',
            "target_prompts": ["a corgi jumping", "</script>"],
            "steps": 30,
            "seed": 7,
        }
    )
    values: dict[str, object] = {
        "id": "01960000-0000-7000-8000-000000000000",
        "tenant": "acme",
        "kind": JobKind.synthesis,
        "model": "sd15",
        "status": JobStatus.queued,
        "created_at": 1_700_000_000.123456,
        "input": SYNTHESIS.resolve(body, gw.catalog.get("sd15"), None),
        "queue_position": 3,
    }
    values.update(overrides)
    return JobRecord(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"created_at": 1_700_000_000.0},
        {"created_at": 1_700_000_000.5},
        {"queue_position": None},
        {"model": 'mod\u00e8le "x"'},
        {"kind": JobKind.edit, "attempts": 2},
    ],
)
def test_created_body_matches_the_rendered_job(client: TestClient, overrides: dict) -> None:
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    record = _record(client, **overrides)
    assert gw.created_body(record) == gw.render(record).model_dump_json().encode()


@pytest.mark.parametrize(
    "overrides",
    [
        {"status": JobStatus.running, "started_at": 1_700_000_001.0},
        {"webhook": {"url": "https://example.com/hook", "events": ["job.succeeded"]}},
        {"progress": ProgressRecord(ProgressPhase.denoise, step=1, total=30)},
        {"metrics": {"queue_seconds": 1.0}},
    ],
)
def test_other_jobs_are_rendered_by_the_models(client: TestClient, overrides: dict) -> None:
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    assert gw.created_body(_record(client, **overrides)) is None


def test_a_submission_answers_with_the_job_as_read_back(client: TestClient) -> None:
    # The answer embeds the input JSON the store wrote; reading the job back serializes it anew.
    created = client.post(
        "/v1/syntheses",
        json={"source_prompt": 'a "corgi" \u00e9', "target_prompts": ["a corgi \u6f22"], "seed": 3},
    )
    assert created.status_code == 202
    again = client.get(f"/v1/jobs/{created.json()['id']}")
    assert again.status_code == 200 and again.content == created.content
