"""Property-based pass over the committed OpenAPI document: no input makes the gateway fail (5xx).

Generated requests run in-process against an app on the real test Redis and file storage, with
a valid API key. Outbound image fetches are refused before any lookup so arbitrary generated URLs
never leave the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from masactrl_jobs import netguard
from service.config import GatewaySettings
from service.main import create_app
from tests.service.conftest import ACME_KEY, bearer

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"

schema = schemathesis.openapi.from_path(str(COMMITTED))
# Bounded so the whole pass stays well under a minute on two cores.
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])


@pytest.fixture()
def app(make_settings: Callable[..., GatewaySettings], monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    def no_network(url: str, **kwargs: object) -> bytes:
        raise netguard.FetchError("outbound fetches are disabled in this test")

    monkeypatch.setattr(netguard, "fetch", no_network)
    return create_app(make_settings(max_wait_seconds=0, sse_ping_seconds=1))


@schema.parametrize()
@hypothesis.settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
    database=None,
)
def test_no_input_causes_a_server_error(case: schemathesis.Case, app: FastAPI) -> None:
    case.call_and_validate(
        app=app,
        headers=bearer(ACME_KEY),
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
