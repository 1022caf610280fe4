"""Image intake through the API: sniffing, EXIF, bombs, size limits, SSRF, s3:// and backends.

Only loopback is contacted: other address classes go through a replaced resolver or literal IPs
and are refused before any connection is attempted.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from masactrl_jobs import netguard
from masactrl_jobs.store import JobStore
from service.config import GatewaySettings
from tests.images import data_url, jpeg_bytes, png_bytes, webp_bytes
from tests.service.conftest import ImageServer, s3_client


def edit(client: TestClient, image: str, **overrides: Any) -> httpx.Response:
    return client.post("/v1/edits", json={"image": image, "target_prompts": ["x"], **overrides})


def upload(client: TestClient, data: bytes, filename: str = "upload.bin") -> httpx.Response:
    return client.post(
        "/v1/edits",
        files={"image": (filename, data, "application/octet-stream")},
        data={"params": json.dumps({"target_prompts": ["x"]})},
    )


def stored(settings: GatewaySettings, key: str) -> bytes:
    return (Path(settings.storage_url.removeprefix("file://")) / key).read_bytes()


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    return response.json()["error"]["details"][0]


def noise_png(side: int) -> bytes:
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(side: int) -> bytes:
    """A small PNG whose header claims side×side pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * side) * 64, 9)  # a few rows of a huge image
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


# --- content sniffing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "declared", "ext"),
    [
        (png_bytes(), "image/jpeg", "png"),
        (jpeg_bytes(), "image/png", "jpg"),
        (webp_bytes(), "image/gif", "webp"),
    ],
)
def test_type_comes_from_content_not_declaration(
    client: TestClient, settings: GatewaySettings, data: bytes, declared: str, ext: str
) -> None:
    response = edit(client, data_url(data, declared))
    assert response.status_code == 202, response.text
    key = response.json()["input"]["image"]
    assert key == f"inputs/{hashlib.sha256(data).hexdigest()}.{ext}"
    assert stored(settings, key) == data
    response = upload(client, data, filename="picture.gif")
    assert response.json()["input"]["image"] == key


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"GIF89a" + b"\x00" * 40, "GIF"),
        (b"%PDF-1.7 not an image", "PDF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"just some text pretending to be a png", "not a PNG, JPEG or WebP"),
        (png_bytes()[:60], "truncated"),
    ],
)
def test_non_images_are_refused_by_content(client: TestClient, data: bytes, phrase: str) -> None:
    for response in (edit(client, data_url(data, "image/png")), upload(client, data, "x.png")):
        detail = error_of(response)
        assert detail["loc"] == ["body", "image"] and detail["type"] == "invalid_image"
        assert phrase in detail["message"]


def test_exif_orientation_is_applied(client: TestClient, settings: GatewaySettings) -> None:
    original = jpeg_bytes(64, 32, orientation=6)
    key = edit(client, data_url(original)).json()["input"]["image"]
    upright = stored(settings, key)
    assert upright != original and key.endswith(".jpg")
    assert key == f"inputs/{hashlib.sha256(upright).hexdigest()}.jpg"
    assert Image.open(io.BytesIO(upright)).size == (32, 64)


def test_malformed_data_urls(client: TestClient) -> None:
    assert "base64" in error_of(edit(client, "data:image/png,rawbytes"))["message"]
    assert "base64" in error_of(edit(client, "data:image/png;base64,@@@"))["message"]


# --- bombs and size limits ------------------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    bomb = png_bomb(50_000)
    assert len(bomb) < 10_000
    started = time.monotonic()
    detail = error_of(edit(client, data_url(bomb)))
    assert time.monotonic() - started < 2
    assert "50000×50000" in detail["message"] and "4096" in detail["message"]
    assert "50000×50000" in error_of(upload(client, bomb))["message"]


def test_side_limit_is_configurable(
    make_settings: Callable[..., GatewaySettings], make_client
) -> None:
    client = make_client(make_settings(max_image_side=64))
    assert edit(client, data_url(png_bytes(64, 64))).status_code == 202
    assert "limit is 64×64" in error_of(edit(client, data_url(png_bytes(65, 10))))["message"]


def test_oversize_images_are_refused_every_way(
    make_settings: Callable[..., GatewaySettings], make_client, image_server: ImageServer
) -> None:
    client = make_client(make_settings(max_image_bytes=4096, allow_loopback_http=True))
    big = noise_png(64)
    assert len(big) > 4096
    assert "limit" in error_of(edit(client, data_url(big)))["message"]
    assert "limit" in error_of(upload(client, big))["message"]
    image_server.routes["/big.png"] = (200, {"Content-Type": "image/png"}, big)
    detail = error_of(edit(client, image_server.url("/big.png")))
    assert detail["type"] == "image_too_large"


# --- https:// sources and the SSRF guard ------------------------------------------------------


def test_url_images_are_fetched_through_the_guard(
    make_settings: Callable[..., GatewaySettings], make_client, image_server: ImageServer
) -> None:
    # Development mode with loopback http allowed: the only way a test may fetch anything.
    settings = make_settings(allow_loopback_http=True)
    client = make_client(settings)
    image = png_bytes(40, 40)
    image_server.routes["/cat.png"] = (200, {"Content-Type": "text/plain"}, image)
    response = edit(client, image_server.url("/cat.png"))
    assert response.status_code == 202, response.text
    assert stored(settings, response.json()["input"]["image"]) == image

    image_server.routes["/moved.png"] = (302, {"Location": "http://169.254.169.254/"}, b"")
    detail = error_of(edit(client, image_server.url("/moved.png")))
    assert detail["type"] == "fetch_failed" and "redirect" in detail["message"]
    assert image_server.hits.count("/moved.png") == 1
    assert error_of(edit(client, image_server.url("/missing.png")))["type"] == "fetch_failed"


class Resolver:
    """Stands in for DNS, so hostnames can resolve to any address class without a lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    def __call__(self, host: str, port: int) -> list[str]:
        if host not in self.table:
            raise socket.gaierror(-2, "Name or service not known")
        return self.table[host]


BLOCKED = {
    "loopback": "127.0.0.1",
    "loopback6": "::1",
    "private10": "10.1.2.3",
    "private172": "172.16.5.4",
    "private192": "192.168.1.1",
    "linklocal": "169.254.10.10",
    "metadata": "169.254.169.254",
    "cgnat": "100.64.0.1",
    "multicast": "224.0.0.251",
    "reserved": "240.0.0.1",
    "unspecified": "0.0.0.0",
    "mapped": "::ffff:10.0.0.1",
    "uniquelocal": "fd12:3456::1",
    "linklocal6": "fe80::1",
}


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_ssrf_every_blocked_address_class(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    address = BLOCKED[name]
    monkeypatch.setattr(netguard, "resolve_host", Resolver({f"{name}.example": [address]}))
    detail = error_of(edit(client, f"https://{name}.example/cat.png"))
    assert detail["type"] == "unsafe_url" and detail["loc"] == ["body", "image"]
    assert str(ipaddress.ip_address(address)) in detail["message"]
    # The same address as a literal in the URL.
    literal = f"[{address}]" if ":" in address else address
    assert error_of(edit(client, f"https://{literal}/cat.png"))["type"] == "unsafe_url"


def test_ssrf_one_bad_address_among_good_ones(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        netguard, "resolve_host", Resolver({"mixed.example": ["93.184.215.14", "10.0.0.1"]})
    )
    assert error_of(edit(client, "https://mixed.example/cat.png"))["type"] == "unsafe_url"


def test_ssrf_plain_http_and_credentials_are_refused(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netguard, "resolve_host", Resolver({"public.example": ["93.184.215.14"]}))
    assert error_of(edit(client, "http://public.example/cat.png"))["type"] == "unsafe_url"
    assert error_of(edit(client, "https://u:p@public.example/a.png"))["type"] == "unsafe_url"
    # Loopback http is refused unless the development setting allows it.
    assert error_of(edit(client, "http://127.0.0.1:9/a.png"))["type"] == "unsafe_url"


def test_ssrf_applies_to_mask_urls(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netguard, "resolve_host", Resolver({"m.example": ["10.9.9.9"]}))
    regions = [{"source": "https://m.example/s.png", "target": data_url(png_bytes())}]
    detail = error_of(
        edit(
            client, data_url(png_bytes()), control={"mask": {"mode": "manual", "regions": regions}}
        )
    )
    assert detail["loc"] == ["body", "control", "mask", "regions", 0, "source"]


def test_unresolvable_host(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netguard, "resolve_host", Resolver({}))
    assert error_of(edit(client, "https://nowhere.example/a.png"))["type"] == "fetch_failed"


# --- s3:// references and both storage backends ------------------------------------------------


def test_s3_references_only_inside_our_bucket(
    s3_settings: GatewaySettings, make_client, s3_server: Any
) -> None:
    client = make_client(s3_settings)
    s3 = s3_client(s3_server)
    image = png_bytes(30, 30)
    s3.put_object(Bucket=s3_server.bucket, Key="svc/uploads/cat.png", Body=image)
    s3.put_object(Bucket=s3_server.bucket, Key="elsewhere/cat.png", Body=image)
    response = edit(client, f"s3://{s3_server.bucket}/svc/uploads/cat.png")
    assert response.status_code == 202, response.text
    key = response.json()["input"]["image"]
    assert key == f"inputs/{hashlib.sha256(image).hexdigest()}.png"
    assert s3.get_object(Bucket=s3_server.bucket, Key=f"svc/{key}")["Body"].read() == image

    assert error_of(edit(client, "s3://someone-else/svc/uploads/cat.png"))["type"] == (
        "foreign_bucket"
    )
    outside = edit(client, f"s3://{s3_server.bucket}/elsewhere/cat.png")
    assert error_of(outside)["type"] == "foreign_bucket"
    missing = edit(client, f"s3://{s3_server.bucket}/svc/uploads/dog.png")
    assert error_of(missing)["type"] == "not_found"
    escape = edit(client, f"s3://{s3_server.bucket}/svc/../elsewhere/cat.png")
    assert error_of(escape)["type"] == "invalid_image_reference"


def test_s3_references_refused_with_file_storage(client: TestClient) -> None:
    assert error_of(edit(client, "s3://bucket/inputs/a.png"))["type"] == "foreign_bucket"


def test_an_earlier_inputs_key_runs_it_again(client: TestClient, settings: GatewaySettings) -> None:
    image = png_bytes(30, 30)
    first = edit(client, data_url(image))
    assert first.status_code == 202, first.text
    key = first.json()["input"]["image"]
    again = edit(client, key)
    assert again.status_code == 202, again.text
    assert again.json()["input"]["image"] == key and stored(settings, key) == image

    unknown = edit(client, f"inputs/{hashlib.sha256(b'never sent').hexdigest()}.png")
    assert error_of(unknown)["type"] == "not_found"
    assert error_of(unknown)["loc"] == ["body", "image"]
    # Only an input's key: results, other folders and paths that climb out are no references.
    for ref in ("results/x/target_0.png", "inputs/../secrets.png", f"{key}.png", "inputs/a.png"):
        assert error_of(edit(client, ref))["type"] == "invalid_image_reference", ref


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_inputs_and_results_on_both_backends(
    backend: str,
    settings: GatewaySettings,
    request: pytest.FixtureRequest,
    make_client,
    redis_url: str,
) -> None:
    if backend == "s3":
        settings = request.getfixturevalue("s3_settings")
    client = make_client(settings)
    storage = client.app.state.gateway.storage
    image = png_bytes(16, 16)
    job = edit(client, data_url(image)).json()
    assert storage.get(job["input"]["image"]) == image

    # A worker's part, through the same storage interface and job store.
    store = JobStore.from_url(redis_url)
    store.start(job["id"], "w")
    key = f"results/{job['id']}/target_0.png"
    result = png_bytes(16, 16, color=(9, 9, 9))
    storage.put(key, result, "image/png")
    store.succeed(
        job["id"], [{"role": "target", "prompt": "x", "key": key, "width": 16, "height": 16}]
    )
    store.close()
    url = client.get(f"/v1/jobs/{job['id']}").json()["output"]["images"][0]["url"]
    if backend == "file":
        assert url.startswith("http://testserver/v1/files/")
        downloaded = TestClient(client.app).get(url).content
    else:
        # A presigned URL of moto's loopback S3 server.
        assert url.startswith(settings.s3_endpoint_url) and "X-Amz-Signature" in url
        downloaded = httpx.get(url).content
    assert downloaded == result

    # Retention: once expired, results and the record go.
    gateway = client.app.state.gateway
    raw = redis.Redis.from_url(redis_url)
    raw.zadd("masactrl:expiry", {job["id"]: 0})
    raw.zadd("masactrl:inputs", {job["input"]["image"]: 0})
    raw.close()
    purged = client.portal.call(gateway.sweep_expired)
    assert purged == (1, 1)
    assert not storage.exists(key) and not storage.exists(job["input"]["image"])
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
