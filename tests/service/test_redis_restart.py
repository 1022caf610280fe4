"""The gateway across a Redis restart: no request fails on a connection pooled before it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import GatewaySettings
from tests.conftest import RedisServer, free_port
from tests.service.conftest import SYNTHESIS

REQUESTS_AFTER = 30


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (with AOF): it is restarted under the gateway."""
    server = RedisServer(port=free_port(), data_dir=tmp_path / "redis")
    server.data_dir.mkdir()
    server.start()
    yield server
    server.stop()


def test_every_request_after_a_redis_restart_succeeds(
    private_redis: RedisServer,
    make_settings: Callable[..., GatewaySettings],
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(make_settings(redis_url=private_redis.url))
    jobs = []
    for _ in range(3):
        response = client.post("/v1/syntheses", json=SYNTHESIS)
        assert response.status_code == 202, response.text
        jobs.append(response.json()["id"])
    assert client.get("/readyz").status_code == 200

    private_redis.restart()  # every connection the gateway pooled is now stale

    statuses = [client.get(f"/v1/jobs/{jobs[n % 3]}").status_code for n in range(REQUESTS_AFTER)]
    statuses += [client.post("/v1/syntheses", json=SYNTHESIS).status_code for _ in range(3)]
    statuses += [client.get("/v1/jobs").status_code, client.get("/readyz").status_code]
    assert statuses == [200] * REQUESTS_AFTER + [202] * 3 + [200, 200]
