"""Reading, listing, cancelling and following jobs; tenant isolation; result downloads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from masactrl_jobs.store import JobStore
from service.config import GatewaySettings
from tests.images import png_bytes
from tests.service.conftest import GLOBEX_KEY, SYNTHESIS, bearer, broker_messages


def submit(client: TestClient, **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/syntheses", json={**SYNTHESIS, **overrides})
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture()
def store(redis_url: str) -> JobStore:
    s = JobStore.from_url(redis_url)
    yield s
    s.close()


def read_sse(client: TestClient, path: str, headers: dict[str, str] | None = None) -> list[dict]:
    """Every event of a stream that ends by itself: [{id, event, data}]."""
    events: list[dict] = []
    current: dict[str, Any] = {}
    with client.stream("GET", path, headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


def test_get_job(client: TestClient) -> None:
    job = submit(client)
    response = client.get(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.json() == job


@pytest.mark.parametrize("job_id", ["01890000-0000-7000-8000-000000000000", "nope", "x" * 200])
def test_unknown_job_is_404(client: TestClient, job_id: str) -> None:
    for response in (
        client.get(f"/v1/jobs/{job_id}"),
        client.post(f"/v1/jobs/{job_id}/cancel"),
        client.get(f"/v1/jobs/{job_id}/events"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_other_tenants_see_404_never_403(client: TestClient, redis_client: redis.Redis) -> None:
    job = submit(client)
    other = bearer(GLOBEX_KEY)
    not_found = client.get("/v1/jobs/01890000-0000-7000-8000-000000000000").json()
    for response in (
        client.get(f"/v1/jobs/{job['id']}", headers=other),
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=other),
        client.get(f"/v1/jobs/{job['id']}/events", headers=other),
    ):
        assert response.status_code == 404
        # Indistinguishable from a job that never existed, apart from the id echoed back.
        assert response.json()["error"]["code"] == not_found["error"]["code"]
    assert client.get("/v1/jobs", headers=other).json() == {"data": [], "next_cursor": None}
    # The other tenant's cancel attempt changed nothing.
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_list_newest_first_with_cursor_and_filter(client: TestClient, store: JobStore) -> None:
    ids = [submit(client)["id"] for _ in range(5)]
    client.post("/v1/syntheses", json=SYNTHESIS, headers=bearer(GLOBEX_KEY))
    store.start(ids[1], "w")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[4], ids[3]]
    page = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    page = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in page["data"]] == [ids[0]] and page["next_cursor"] is None
    running = client.get("/v1/jobs", params={"status": "running"}).json()["data"]
    assert [j["id"] for j in running] == [ids[1]] and running[0]["queue_position"] is None
    queued = client.get("/v1/jobs", params={"status": "queued"}).json()["data"]
    # globex's one job takes the second start (fair share between the two tenants).
    assert [j["queue_position"] for j in queued] == [5, 4, 3, 1]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 101}, ["query", "limit"]),
        ({"status": "done"}, ["query", "status"]),
        ({"cursor": "not-a-cursor"}, ["query", "cursor"]),
    ],
)
def test_list_rejects_bad_parameters(client: TestClient, params: dict, loc: list[str]) -> None:
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == loc


def test_cancel_queued_job_is_immediate(client: TestClient, redis_client: redis.Redis) -> None:
    job = submit(client)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "canceled" and body["completed_at"] is not None
    assert body["queue_position"] is None
    # The broker message stays; the worker drops it because the job is terminal.
    assert broker_messages(redis_client, "masactrl.sd15") == [("masactrl.run_job", [job["id"]])]
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"
    assert "canceled" in again.json()["error"]["message"]


def test_cancel_running_job_flags_it(client: TestClient, store: JobStore) -> None:
    job = submit(client)
    store.start(job["id"], "w")
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert store.cancel_requested(job["id"])
    assert store.finish_canceled(job["id"]).ok
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


@pytest.mark.parametrize("end", ["succeed", "fail"])
def test_cancel_terminal_job_is_409(client: TestClient, store: JobStore, end: str) -> None:
    job = submit(client)
    store.start(job["id"], "w")
    if end == "succeed":
        store.succeed(job["id"], [])
    else:
        store.fail(job["id"], "invalid_input", "The image could not be inverted.")
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    shown = client.get(f"/v1/jobs/{job['id']}").json()
    if end == "fail":
        assert shown["error"] == {
            "code": "invalid_input",
            "message": "The image could not be inverted.",
        }


def _run_fake_worker(store: JobStore, job_id: str, root: Path | None = None) -> None:
    store.start(job_id, "fake-worker")
    for step in (1, 2):
        store.progress(job_id, "denoise", step, 2)
    images = []
    if root is not None:
        key = f"results/{job_id}/source_0.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(png_bytes(8, 8))
        images.append(
            {"role": "source", "prompt": "a photo of a cat", "key": key, "width": 8, "height": 8}
        )
    store.succeed(job_id, images, {"denoise_seconds": 0.2, "unet_image_evals": 4})


def test_sse_replays_then_resumes_after_last_event_id(
    client: TestClient, store: JobStore, settings: GatewaySettings
) -> None:
    job = submit(client)
    _run_fake_worker(store, job["id"])
    path = f"/v1/jobs/{job['id']}/events"
    events = read_sse(client, path)
    assert [e["event"] for e in events] == [
        "status",
        "status",
        "progress",
        "progress",
        "succeeded",
    ]
    assert events[0]["data"] == {"job_id": job["id"], "status": "queued"}
    assert events[1]["data"]["status"] == "running" and events[1]["data"]["attempt"] == 1
    assert events[3]["data"]["fraction"] == 1.0
    # The final event carries the whole job object.
    assert events[-1]["data"]["status"] == "succeeded"
    assert events[-1]["data"]["metrics"]["unet_image_evals"] == 4
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    resumed = read_sse(client, path, headers={"Last-Event-ID": ids[1]})
    assert [e["id"] for e in resumed] == ids[2:]
    # Nothing after the final event: 204 tells EventSource to stop reconnecting.
    assert client.get(path, headers={"Last-Event-ID": ids[-1]}).status_code == 204
    bad = client.get(path, headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["loc"] == ["header", "Last-Event-ID"]


def test_sse_streams_live_events(client: TestClient, store: JobStore) -> None:
    job = submit(client)

    def worker() -> None:
        time.sleep(0.3)
        store.start(job["id"], "w")
        time.sleep(0.2)
        store.progress(job["id"], "invert", 3, 10)
        time.sleep(0.2)
        store.fail(job["id"], "out_of_memory", "Try a smaller size or fewer targets.")

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    events = read_sse(client, f"/v1/jobs/{job['id']}/events")
    thread.join()
    assert [e["event"] for e in events] == ["status", "status", "progress", "failed"]
    assert events[2]["data"]["phase"] == "invert"
    assert events[-1]["data"]["error"]["code"] == "out_of_memory"
    assert time.monotonic() - started < 5


def test_sse_of_a_canceled_job(client: TestClient) -> None:
    job = submit(client)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    events = read_sse(client, f"/v1/jobs/{job['id']}/events")
    assert [e["event"] for e in events] == ["status", "canceled"]


def test_results_download_through_signed_urls(
    client: TestClient, store: JobStore, settings: GatewaySettings
) -> None:
    job = submit(client)
    root = Path(settings.storage_url.removeprefix("file://"))
    _run_fake_worker(store, job["id"], root)
    shown = client.get(f"/v1/jobs/{job['id']}").json()
    assert shown["status"] == "succeeded"
    image = shown["output"]["images"][0]
    assert image["key"] == f"results/{job['id']}/source_0.png"
    assert image["role"] == "source" and (image["width"], image["height"]) == (8, 8)
    assert shown["output"]["expires_at"] is not None
    assert shown["metrics"]["queue_seconds"] is not None
    assert shown["metrics"]["total_seconds"] is not None
    # The URL alone is the credential: no Authorization header needed.
    anonymous = TestClient(client.app)
    download = anonymous.get(image["url"])
    assert download.status_code == 200
    assert download.content == (root / image["key"]).read_bytes()
    assert download.headers["content-type"] == "image/png"
    tampered = image["url"].replace("signature=", "signature=0")
    assert anonymous.get(tampered).status_code in (403, 422)
    forged = image["url"].replace(job["id"], "01890000-0000-7000-8000-000000000000")
    assert anonymous.get(forged).status_code == 403
    expired = image["url"].split("?")[0] + "?expires=1&signature=" + "0" * 64
    response = anonymous.get(expired)
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert anonymous.get("/v1/files/results/x.png").status_code == 422  # no signature at all


def test_missing_file_with_valid_signature_is_404(client: TestClient) -> None:
    storage = client.app.state.gateway.storage
    url = storage.url("results/nothing/here.png")
    assert client.get(url).status_code == 404


def test_files_route_is_empty_with_s3(
    make_settings: Callable[..., GatewaySettings], make_client, s3_server
) -> None:
    settings = make_settings(
        storage_url=f"s3://{s3_server.bucket}/svc",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_region=s3_server.region,
    )
    client = make_client(settings)
    assert client.get("/v1/files/results/a.png?expires=9999999999&signature=00").status_code == 404


def test_sse_preview_events_carry_short_lived_urls_and_a_replay_keeps_the_latest(
    client: TestClient, store: JobStore, make_settings: Callable[..., GatewaySettings]
) -> None:
    from urllib.parse import parse_qs, urlsplit

    from masactrl_jobs.schema import ImageRole
    from masactrl_jobs.store import PreviewImageRecord, PreviewRecord

    job = submit(client, previews=True)
    assert job["input"]["previews"] is True and job["preview"] is None
    job_id = job["id"]
    store.start(job_id, "w")

    def preview(step: int) -> PreviewRecord:
        keys = [(ImageRole.source, 0), (ImageRole.target, 0)]
        images = [
            PreviewImageRecord(role, index, f"results/{job_id}/previews/{step}/{role.value}_0.webp")
            for role, index in keys
        ]
        return PreviewRecord(step, 10, images)

    store.progress(job_id, "denoise", 5, 10)
    store.preview(job_id, preview(5))
    store.progress(job_id, "denoise", 6, 10)
    store.preview(job_id, preview(6))
    store.preview(job_id, preview(8))
    shown = client.get(f"/v1/jobs/{job_id}").json()
    assert shown["preview"]["step"] == 8
    store.succeed(job_id, [])

    events = read_sse(client, f"/v1/jobs/{job_id}/events")
    # Read back in one batch, the older previews are left out: their images are gone anyway.
    assert [e["event"] for e in events] == [
        "status",
        "status",
        "progress",
        "progress",
        "preview",
        "succeeded",
    ]
    data = events[4]["data"]
    assert data["job_id"] == job_id and (data["step"], data["steps"]) == (8, 10)
    assert [(i["role"], i["index"]) for i in data["images"]] == [("source", 0), ("target", 0)]
    url = urlsplit(data["images"][1]["url"])
    assert url.path == f"/v1/files/results/{job_id}/previews/8/target_0.webp"
    expires = int(parse_qs(url.query)["expires"][0])
    ttl = make_settings().preview_url_ttl_seconds
    assert time.time() < expires <= time.time() + ttl + 1
    # The ended job shows no preview any more.
    assert client.get(f"/v1/jobs/{job_id}").json()["preview"] is None


def test_live_preview_events_each_reach_a_listening_client(
    client: TestClient, store: JobStore
) -> None:
    from masactrl_jobs.schema import ImageRole
    from masactrl_jobs.store import PreviewImageRecord, PreviewRecord

    job_id = submit(client, previews=True)["id"]

    def worker() -> None:
        time.sleep(0.3)
        store.start(job_id, "w")
        for step in (2, 4):
            time.sleep(0.3)
            key = f"results/{job_id}/previews/{step}/source_0.webp"
            store.preview(
                job_id, PreviewRecord(step, 6, [PreviewImageRecord(ImageRole.source, 0, key)])
            )
        time.sleep(0.3)
        store.succeed(job_id, [])

    thread = threading.Thread(target=worker)
    thread.start()
    events = read_sse(client, f"/v1/jobs/{job_id}/events")
    thread.join()
    assert [e["data"]["step"] for e in events if e["event"] == "preview"] == [2, 4]
