"""Gateway fixtures: settings on the session's real Redis and a temporary file store, a client,
API keys of two tenants, image makers and a reader of the Celery broker lists."""

from __future__ import annotations

import base64
import hashlib
import json
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


SYNTHESIS = {"source_prompt": "a photo of a cat", "target_prompts": ["a photo of a running cat"]}


# --- loopback HTTP server and S3 settings ---------------------------------------------------


class ImageServer:
    """A plain-HTTP server on 127.0.0.1 answering fixed (status, headers, body) per path."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.hits.append(self.path)
                status, headers, body = server.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture()
def s3_settings(make_settings: Callable[..., GatewaySettings], s3_server: Any) -> GatewaySettings:
    """Settings on moto's S3 server, objects under the prefix ``svc/`` of the test bucket."""
    return make_settings(
        storage_url=f"s3://{s3_server.bucket}/svc",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_region=s3_server.region,
    )


def s3_client(s3_server: Any) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
