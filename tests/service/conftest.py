"""Gateway fixtures: settings on the session's real Redis and a temporary file store, a client,
API keys of two tenants, image makers and a reader of the Celery broker lists."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.config import ApiKeyConfig, GatewaySettings
from service.main import create_app

ACME_KEY = "acme-test-key-5b1d0c2e9f"
GLOBEX_KEY = "globex-test-key-77aa03c41e"
ACME_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"acme webhook secret, 32 bytes.!!").decode()
GLOBEX_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"globex webhook secret 32 bytes!!").decode()
SIGNING_SECRET = "test-url-signing-secret-9f8e7d6c5b4a39281706"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MASACTRL_* variable or .env file from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("MASACTRL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def make_settings(redis_url: str, tmp_path: Path) -> Callable[..., GatewaySettings]:
    """Development-mode settings for two tenants; keyword arguments override any field."""

    def make(**overrides: Any) -> GatewaySettings:
        values: dict[str, Any] = {
            "_env_file": None,
            "environment": "development",
            "redis_url": redis_url,
            "storage_url": (tmp_path / "storage").as_uri(),
            "url_signing_secret": SIGNING_SECRET,
            "public_base_url": "http://testserver",
            "api_keys": [
                ApiKeyConfig(
                    sha256=sha256_hex(ACME_KEY), tenant="acme", webhook_secret=ACME_WEBHOOK_SECRET
                ),
                ApiKeyConfig(
                    sha256=sha256_hex(GLOBEX_KEY),
                    tenant="globex",
                    webhook_secret=GLOBEX_WEBHOOK_SECRET,
                ),
            ],
            "cleanup_interval_seconds": 0,
            "rate_limit_per_second": 1000,
            "rate_limit_burst": 1000,
        }
        values.update(overrides)
        return GatewaySettings(**values)

    return make


@pytest.fixture()
def settings(make_settings: Callable[..., GatewaySettings]) -> GatewaySettings:
    return make_settings()


@pytest.fixture()
def make_client() -> Iterator[Callable[..., TestClient]]:
    """Open a client on an app built from the given settings (closed after the test)."""
    stack: list[TestClient] = []

    def make(settings: GatewaySettings, key: str | None = ACME_KEY) -> TestClient:
        client = TestClient(create_app(settings), headers=bearer(key) if key else None)
        client.__enter__()
        stack.append(client)
        return client

    yield make
    for client in reversed(stack):
        client.__exit__(None, None, None)


@pytest.fixture()
def client(settings: GatewaySettings, make_client: Callable[..., TestClient]) -> TestClient:
    """A client authenticated as tenant ``acme``."""
    return make_client(settings)


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def broker_messages(client: redis.Redis, queue: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of each Celery message waiting in a queue, oldest first."""
    out = []
    # Celery LPUSHes and workers BRPOP, so the oldest message is last in the list.
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], body[0]))
    return out


# --- images ---------------------------------------------------------------------------------


def png_bytes(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 64, height: int = 32, orientation: int | None = None) -> bytes:
    from PIL import Image

    options: dict[str, Any] = {"quality": 90}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def webp_bytes(width: int = 24, height: int = 24) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 10, 200)).save(buffer, format="WEBP")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


SYNTHESIS = {"source_prompt": "a photo of a cat", "target_prompts": ["a photo of a running cat"]}
