"""The queue policy at the API: priorities within the key's range, deadlines, positions across
tenants, retries, listing by status and the metrics. Real Redis; the worker's starts are the
store's ``claim``, as a worker makes them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient

from masactrl_jobs.store import JobStore
from service.config import ApiKeyConfig, GatewaySettings
from tests.service.conftest import (
    ACME_KEY,
    ACME_WEBHOOK_SECRET,
    GLOBEX_KEY,
    GLOBEX_WEBHOOK_SECRET,
    SYNTHESIS,
    bearer,
    sha256_hex,
)


@pytest.fixture()
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_url)
    yield s
    s.close()


@pytest.fixture()
def client(make_settings: Callable[..., GatewaySettings], make_client: Any) -> TestClient:
    """acme may use priorities 0..5 at weight 3; globex the default range at weight 1."""
    settings = make_settings(
        api_keys=[
            ApiKeyConfig(
                sha256=sha256_hex(ACME_KEY),
                tenant="acme",
                webhook_secret=ACME_WEBHOOK_SECRET,
                weight=3,
                priorities=(0, 5),
            ),
            ApiKeyConfig(
                sha256=sha256_hex(GLOBEX_KEY), tenant="globex", webhook_secret=GLOBEX_WEBHOOK_SECRET
            ),
        ]
    )
    return make_client(settings)


def submit(client: TestClient, key: str = ACME_KEY, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, **fields}, headers=bearer(key))
    assert response.status_code == 202, response.text
    return response.json()


def error_loc(response: Any) -> list[list[str]]:
    return [d["loc"] for d in response.json()["error"]["details"]]


def in_seconds(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def test_a_priority_outside_the_keys_range_is_422_at_priority(client: TestClient) -> None:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, "priority": 6})
    assert response.status_code == 422
    assert error_loc(response) == [["body", "priority"]]
    assert "0 to 5" in response.json()["error"]["details"][0]["message"]
    assert submit(client, priority=5)["priority"] == 5


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"start_by": "2020-01-01T00:00:00Z"}, ["body", "start_by"]),
        ({"start_by": in_seconds(60), "max_queue_seconds": 60}, ["body", "max_queue_seconds"]),
        ({"start_by": "2030-01-01T00:00:00"}, ["body", "start_by"]),  # no time zone
        ({"max_queue_seconds": 0}, ["body", "max_queue_seconds"]),
    ],
)
def test_a_deadline_already_past_or_ambiguous_is_422(
    client: TestClient, fields: dict[str, Any], loc: list[str]
) -> None:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, **fields})
    assert response.status_code == 422, response.text
    assert error_loc(response) == [loc]


def test_positions_follow_fair_share_and_priority(client: TestClient, store: JobStore) -> None:
    # acme (weight 3) queues four jobs, one of them urgent; globex (weight 1) one job.
    acme = [submit(client) for _ in range(3)]
    urgent = submit(client, priority=5)
    other = submit(client, GLOBEX_KEY)
    ids = [urgent["id"], *(j["id"] for j in acme), other["id"]]
    shown = {
        i: client.get(
            f"/v1/jobs/{i}", headers=bearer(ACME_KEY if i != other["id"] else GLOBEX_KEY)
        ).json()["queue_position"]
        for i in ids
    }
    started = []
    while (claimed := store.claim("x", "sd15", "w", 30)).job_id is not None:
        started.append(claimed.job_id)
    assert sorted(ids, key=shown.__getitem__) == started
    assert started[0] == urgent["id"]
    # globex is not behind all of acme's batch: weights 3:1 give it the 2nd or 4th start.
    assert started.index(other["id"]) <= 3


def test_an_expired_job_is_listed_and_streamed_as_expired(
    client: TestClient, store: JobStore
) -> None:
    job = submit(client, max_queue_seconds=1)
    assert job["start_by"] is not None
    time.sleep(1.1)
    assert store.expire_due(["sd15"]) == [job["id"]]
    shown = client.get(f"/v1/jobs/{job['id']}").json()
    assert shown["status"] == "expired" and shown["queue_position"] is None
    listed = client.get("/v1/jobs", params={"status": "expired"}).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events == ["event: status", "event: expired"]


def test_retry_makes_a_linked_job_once(client: TestClient, store: JobStore) -> None:
    job = submit(client, priority=2)
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409  # queued
    client.post(f"/v1/jobs/{job['id']}/cancel")
    response = client.post(f"/v1/jobs/{job['id']}/retry", headers={"Idempotency-Key": "r1"})
    assert response.status_code == 201, response.text
    retried = response.json()
    assert retried["retry_of"] == job["id"] and retried["status"] == "queued"
    assert retried["input"] == job["input"] and retried["priority"] == 2
    assert response.headers["Location"].endswith(retried["id"])
    assert client.get(f"/v1/jobs/{job['id']}").json()["retried_by"] == retried["id"]
    replay = client.post(f"/v1/jobs/{job['id']}/retry", headers={"Idempotency-Key": "r1"})
    assert replay.status_code == 200 and replay.json()["id"] == retried["id"]
    again = client.post(f"/v1/jobs/{job['id']}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_retried"
    other = client.post(f"/v1/jobs/{job['id']}/retry", headers=bearer(GLOBEX_KEY))
    assert other.status_code == 404


def test_retry_of_a_running_or_succeeded_job_is_409(client: TestClient, store: JobStore) -> None:
    job = submit(client)
    store.claim(job["id"], "sd15", "w", 30)
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409
    store.succeed(job["id"], [])
    response = client.post(f"/v1/jobs/{job['id']}/retry")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_retryable"


def test_retry_takes_new_queue_options(client: TestClient, store: JobStore) -> None:
    job = submit(client)
    store.claim(job["id"], "sd15", "w", 30)
    store.fail(job["id"], "internal_error", "boom")
    refused = client.post(f"/v1/jobs/{job['id']}/retry", json={"priority": 9})
    assert refused.status_code == 422 and error_loc(refused) == [["body", "priority"]]
    response = client.post(
        f"/v1/jobs/{job['id']}/retry", json={"priority": 4, "max_queue_seconds": 30}
    )
    assert response.status_code == 201, response.text
    assert response.json()["priority"] == 4 and response.json()["start_by"] is not None


def test_metrics_show_queued_jobs_by_tenant_and_priority_and_expirations(
    client: TestClient, store: JobStore
) -> None:
    submit(client, priority=1)
    submit(client, priority=1)
    submit(client, GLOBEX_KEY)
    expiring = submit(client, GLOBEX_KEY, max_queue_seconds=1)
    time.sleep(1.1)
    assert store.expire_due(["sd15"]) == [expiring["id"]]
    text = client.get("/metrics").text
    assert 'masactrl_queued_jobs{model="sd15",priority="1",tenant="acme"} 2.0' in text
    assert 'masactrl_queued_jobs{model="sd15",priority="0",tenant="globex"} 1.0' in text
    assert 'masactrl_jobs_expired{model="sd15"} 1.0' in text
