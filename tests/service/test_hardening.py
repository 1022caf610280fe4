"""What an attack and a fault-injection run found at the gateway (issue 12), each as a test:
strict input, duplicate keys, one content-type rule, capped echoes, nothing left behind by a
refused request, held-connection caps, the ops token and offline docs."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import GatewaySettings
from tests.images import data_url, png_bytes
from tests.service.conftest import GLOBEX_KEY, SYNTHESIS, bearer
from tests.service.test_images import noise_png


def storage_files(settings: GatewaySettings) -> list[str]:
    root = Path(settings.storage_url.removeprefix("file://"))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def edit_body(**overrides: Any) -> dict[str, Any]:
    return {"image": data_url(png_bytes()), "target_prompts": ["a cat in a hat"], **overrides}


def post_json(client: TestClient, path: str, raw: str) -> Any:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


# --- strict input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", "true"),
        ("steps", '"6"'),
        ("seed", "1.5"),
        ("guidance_scale", '"7.5"'),
        ("guidance_scale", "false"),
        ("width", '"512"'),
    ],
)
def test_no_coercion_into_numbers(client: TestClient, field: str, value: str) -> None:
    raw = f'{{"source_prompt": "a cat", "target_prompts": ["x"], "{field}": {value}}}'
    response = post_json(client, "/v1/syntheses", raw)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == ["body", field]


def test_numbers_are_still_numbers(client: TestClient) -> None:
    raw = '{"source_prompt": "a cat", "target_prompts": ["x"], "steps": 6, "guidance_scale": 5}'
    response = post_json(client, "/v1/syntheses", raw)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["guidance_scale"] == 5.0


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_named_as_such(client: TestClient, value: str) -> None:
    raw = f'{{"source_prompt": "a cat", "target_prompts": ["x"], "guidance_scale": {value}}}'
    error = post_json(client, "/v1/syntheses", raw).json()["error"]
    assert error["details"][0]["message"] == "must be a finite number"
    assert "30" not in error["message"]


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ('{"source_prompt": "a", "target_prompts": ["x"], "steps": 4, "steps": 5}', "steps"),
        (
            '{"source_prompt": "a", "target_prompts": ["x"], "control": {"mask": {}, "mask": {}}}',
            "mask",
        ),
    ],
)
def test_duplicate_keys_are_refused_by_name(client: TestClient, raw: str, loc: str) -> None:
    response = post_json(client, "/v1/syntheses", raw)
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["type"] == "duplicate_key" and detail["loc"][-1] == loc
    assert repr(loc) in detail["message"]


def test_duplicate_keys_in_a_multipart_params_part(client: TestClient) -> None:
    response = client.post(
        "/v1/edits",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"params": '{"target_prompts": ["x"], "target_prompts": ["y"]}'},
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "params", "target_prompts"]


@pytest.mark.parametrize("path", ["/v1/syntheses", "/v1/edits"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_one_content_type_rule_for_both_submission_routes(
    client: TestClient, path: str, content_type: str | None
) -> None:
    body = json.dumps(SYNTHESIS if path == "/v1/syntheses" else edit_body()).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


# --- what errors say --------------------------------------------------------------------------


def test_long_ids_are_not_echoed_whole(client: TestClient) -> None:
    long_id = "x" * 5000
    for method, path in [("GET", f"/v1/jobs/{long_id}"), ("POST", f"/v1/jobs/{long_id}/cancel")]:
        response = client.request(method, path)
        assert response.status_code == 404
        message = response.json()["error"]["message"]
        assert len(message) < 120 and "x" * 64 + "…" in message


def test_each_thing_is_said_once(client: TestClient) -> None:
    response = client.post("/v1/edits", json=edit_body(image="s3://elsewhere/a.png"))
    message = response.json()["error"]["message"]
    assert not re.search(r"\b(image): \1\b", message), message
    assert message.startswith("image: only s3:// URLs")
    too_big = client.post("/v1/edits", json=edit_body(image=data_url(b"\x89PNG" + b"0" * 10)))
    assert not too_big.json()["error"]["message"].startswith("image: image")


def test_edits_need_an_image_of_at_least_8_by_8(client: TestClient) -> None:
    response = client.post("/v1/edits", json=edit_body(image=data_url(png_bytes(1, 1))))
    assert response.status_code == 422
    assert response.json()["error"]["message"] == ("image is 1×1 pixels; the minimum is 8×8")
    assert (
        client.post("/v1/edits", json=edit_body(image=data_url(png_bytes(8, 8)))).status_code == 202
    )


def test_an_oversize_upload_is_refused_with_its_real_size(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(max_image_bytes=1024 * 1024))
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * (int(1.25 * 1024 * 1024))
    response = client.post(
        "/v1/edits",
        files={"image": ("big.png", data, "image/png")},
        data={"params": '{"target_prompts": ["x"]}'},
    )
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert "1.3 MiB" in message and "1 MiB" in message, message


def test_a_webhook_to_a_decimal_ip_literal_is_refused_at_submission(client: TestClient) -> None:
    for host in ["2852039166", "0xa9fea9fe", "169.254.43518", "127.1"]:
        body = {**SYNTHESIS, "webhook": {"url": f"https://{host}/hook"}}
        response = client.post("/v1/syntheses", json=body)
        assert response.status_code == 422, (host, response.text)
        assert response.json()["error"]["details"][0]["loc"] == ["body", "webhook", "url"]


# --- nothing a refused request sent outlives it ------------------------------------------------


def test_a_bad_mask_leaves_no_stored_image(client: TestClient, settings: GatewaySettings) -> None:
    before = storage_files(settings)
    bad_region = {"source": "data:image/png;base64,AAAA", "target": "data:image/png;base64,AAAA"}
    body = edit_body(control={"mask": {"mode": "manual", "regions": [bad_region]}})
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 422
    assert storage_files(settings) == before


def test_a_full_queue_leaves_no_stored_image(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    settings = make_settings(max_queue_depth=1)
    client = make_client(settings)
    assert client.post("/v1/syntheses", json=SYNTHESIS).status_code == 202
    before = storage_files(settings)
    assert client.post("/v1/edits", json=edit_body()).status_code == 429
    assert storage_files(settings) == before


# --- held connections -------------------------------------------------------------------------


def _hold(client: TestClient, path: str, headers: dict[str, str], started: threading.Event) -> None:
    with client.stream("GET", path, headers=headers) as response:
        started.set()
        for _ in response.iter_lines():
            pass


def test_prefer_wait_is_capped_per_tenant(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(max_waits_per_tenant=1))
    job = client.post("/v1/syntheses", json=SYNTHESIS).json()
    path = f"/v1/jobs/{job['id']}"
    holder = threading.Thread(
        target=client.get, args=(path,), kwargs={"headers": {"Prefer": "wait=2"}}
    )
    holder.start()
    time.sleep(0.5)
    refused = client.get(path, headers={"Prefer": "wait=1"})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_open"
    submitted = client.post("/v1/syntheses", json=SYNTHESIS, headers={"Prefer": "wait=1"})
    assert submitted.status_code == 429
    # Without waiting, and for another tenant, nothing is refused.
    assert client.get(path).status_code == 200
    assert client.get(path, headers={"Prefer": "wait=0", **bearer(GLOBEX_KEY)}).status_code == 404
    holder.join()
    assert client.get(path, headers={"Prefer": "wait=1"}).status_code == 200


def test_event_streams_are_capped_per_tenant(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(max_streams_per_tenant=1, sse_ping_seconds=0.2))
    job = client.post("/v1/syntheses", json=SYNTHESIS).json()
    path = f"/v1/jobs/{job['id']}/events"
    started = threading.Event()
    holder = threading.Thread(target=_hold, args=(client, path, {}, started))
    holder.start()
    assert started.wait(10)
    refused = client.get(path)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_open"
    client.post(f"/v1/jobs/{job['id']}/cancel")  # ends the held stream
    holder.join(10)
    assert not holder.is_alive()
    # The slot is free again once the stream has closed.
    with client.stream("GET", path) as response:
        assert response.status_code == 200


# --- operations routes and docs ---------------------------------------------------------------


OPS_ROUTES = ["/metrics", "/docs", "/redoc", "/openapi.json"]


def test_ops_routes_are_open_by_default(settings: GatewaySettings, make_client) -> None:
    anonymous = make_client(settings, key=None)
    for path in OPS_ROUTES:
        assert anonymous.get(path).status_code == 200, path


def test_ops_token_protects_metrics_and_docs(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(ops_token="ops-secret-token-0123"), key=None)
    for path in OPS_ROUTES:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=bearer("wrong")).status_code == 401, path
        assert client.get(path, headers=bearer("ops-secret-token-0123")).status_code == 200, path
    # Probes stay open: the orchestrator has no token.
    assert client.get("/livez").status_code == 200


def test_the_contract_says_metrics_takes_the_ops_token_or_nothing(client: TestClient) -> None:
    """Open by default and token-guarded when configured: the document allows both, and names
    the 401 the token brings."""
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"OpsToken": []}, {}]
    assert "MASACTRL_OPS_TOKEN" in operation["description"]
    assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert client.get("/metrics").status_code == 200  # no token configured here: open


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_gateway(client: TestClient, page: str) -> None:
    html = client.get(page).text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assets = [u for u in urls if not u.startswith("#")]
    assert any(u.endswith(".js") for u in assets), html
    for url in assets:
        assert url.startswith("/"), f"{page} loads {url} from outside the gateway"
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.content, url


def test_a_multipart_params_part_may_carry_inline_masks(client: TestClient) -> None:
    mask = data_url(noise_png(400))  # about 480 KB, 640 KB as base64
    region = {"source": mask, "target": mask}
    params = {"target_prompts": ["x"], "control": {"mask": {"mode": "manual", "regions": [region]}}}
    text = json.dumps(params)
    assert len(text) > 1024 * 1024  # past Starlette's default part limit
    response = client.post(
        "/v1/edits",
        files={"image": ("a.png", png_bytes(), "image/png"), "params": (None, text)},
    )
    assert response.status_code == 202, response.text


def test_openapi_check_tells_a_stale_document(tmp_path: Path) -> None:
    from service import openapi

    committed = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
    assert openapi.main(["--check", str(committed)]) == 0
    stale = tmp_path / "openapi.json"
    stale.write_text(committed.read_text().replace("createEdit", "makeEdit"))
    assert openapi.main(["--check", str(stale)]) == 1
    written = tmp_path / "fresh.json"
    assert openapi.main(["--output", str(written)]) == 0
    assert written.read_text() == committed.read_text()


def test_a_large_upload_with_a_free_slot_never_waits(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(max_concurrent_large_uploads=1, large_upload_wait_seconds=0))
    body = edit_body(image=data_url(noise_png(200)))  # past the 64 KiB of a plain body
    assert client.post("/v1/edits", json=body).status_code == 202
    assert client.post("/v1/edits", json=body).status_code == 202  # the slot was given back


def test_a_queue_that_fills_while_inputs_are_read_leaves_no_stored_image(
    make_settings: Callable[..., GatewaySettings],
    make_client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.intake import RequestIntake

    settings = make_settings(max_queue_depth=1)
    client = make_client(settings)
    original = RequestIntake.read

    async def slow_read(self: RequestIntake, *args: Any, **kwargs: Any) -> Any:
        image = await original(self, *args, **kwargs)
        # Meanwhile another client takes the last place in the queue.
        other = make_client(settings)
        assert other.post("/v1/syntheses", json=SYNTHESIS).status_code == 202
        return image

    monkeypatch.setattr(RequestIntake, "read", slow_read)
    before = storage_files(settings)
    response = client.post("/v1/edits", json=edit_body())
    assert response.status_code == 429, response.text
    assert storage_files(settings) == before


def test_inputs_stored_before_a_create_refused_as_full_are_swept(
    make_settings: Callable[..., GatewaySettings],
    make_client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.intake import RequestIntake

    settings = make_settings(max_queue_depth=1, job_retention_seconds=60)
    client = make_client(settings)
    original = RequestIntake.store

    async def store_after_the_queue_filled(self: RequestIntake, images: Any) -> None:
        # The second depth check has passed; another client takes the last place now, so
        # create() answers "full" after the image is stored.
        other = make_client(settings)
        assert other.post("/v1/syntheses", json=SYNTHESIS).status_code == 202
        await original(self, images)

    monkeypatch.setattr(RequestIntake, "store", store_after_the_queue_filled)
    before = storage_files(settings)
    response = client.post("/v1/edits", json=edit_body())
    assert response.status_code == 429, response.text
    orphans = [key for key in storage_files(settings) if key not in before]
    assert orphans and all(key.startswith("inputs/") for key in orphans)

    # Retention's sweeper removes them once their time has come.
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    _, inputs_removed = client.portal.call(gateway.sweep_expired)  # type: ignore[union-attr]
    assert inputs_removed == len(orphans)
    assert storage_files(settings) == before


def test_a_prefer_header_past_its_max_length_is_refused_on_every_route(client: TestClient) -> None:
    long = "wait=1, " + "x" * 200
    submitted = client.post("/v1/syntheses", json=SYNTHESIS, headers={"Prefer": long})
    assert submitted.status_code == 422
    assert submitted.json()["error"]["details"][0]["loc"] == ["header", "Prefer"]
    assert client.get("/v1/jobs").json()["data"] == []  # refused before a job was created
    job = client.post("/v1/syntheses", json=SYNTHESIS).json()["id"]
    assert client.get(f"/v1/jobs/{job}", headers={"Prefer": long}).status_code == 422


def test_the_contract_types_headers_and_the_event_stream_as_served(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for path in document["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "header":
                    assert parameter["schema"]["type"] == "string", parameter  # never null
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    for status in ("401", "404", "422"):
        assert list(events[status]["content"]) == ["application/json"]
    missing = client.get("/v1/jobs/01a250d7-a67d-73f6-badd-0a6ec5be026f/events")
    assert (missing.status_code, missing.headers["content-type"]) == (404, "application/json")
