"""Property-based pass over the committed OpenAPI document: no input makes the gateway fail (5xx),
every answer is one the document lists, schema-invalid requests are refused, and schema-valid
ones are accepted, except where a submission's documented rules refuse them.

Generated requests run in-process against an app on the real test Redis and file storage, with
a valid API key. Outbound image fetches are refused before any lookup so arbitrary generated URLs
never leave the machine. A bounded stateful pass then follows the documented links from created
jobs (read, cancel); the never-ending event stream of a live job is left out of it.
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
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from masactrl_jobs import netguard
from service.api.contract import JOB_KIND
from service.config import GatewaySettings
from service.main import create_app
from service.submission import QUEUE_OPTIONS
from tests.service.conftest import ACME_KEY, bearer

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"

schema = schemathesis.openapi.from_path(str(COMMITTED))
# Bounded so the whole pass stays well under a minute on two cores.
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
# The test sends a valid API key with every request: generating (or negating) the security
# header would only be overwritten by it. The auth contract is tested in test_hardening.py.
schema.config.generation.update(with_security_parameters=False)
# A schema-violating body may be refused for its size first (413, before it is parsed).
_rejection = schema.config.checks.negative_data_rejection
_rejection.expected_statuses = [*_rejection.expected_statuses, "413"]


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
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
        missing_required_header,
    ]
    # A submission's rules relate fields and depend on the catalog's models (sizes, block
    # counts, LoRA and condition names, decodable images), which JSON Schema cannot say: its
    # description lists them, each answered 422. So do the queue options' rules of a retry
    # (the key's priority range, one deadline, not past). Every other operation's schema is its
    # whole contract, so a schema-valid request must be accepted there.
    # (schemathesis 4.32 can label a case positive while one of its parts was generated
    # negative, e.g. a header left from a mutation; only wholly positive cases are judged.)
    positive = case.meta is None or all(
        part.mode.is_positive for part in case.meta.components.values()
    )
    raw = case.operation.definition.raw
    if positive and JOB_KIND not in raw and QUEUE_OPTIONS not in raw:
        checks.append(positive_data_acceptance)
    case.call_and_validate(app=app, headers=bearer(ACME_KEY), checks=checks)


# The event stream of a live job never ends by itself, so the stateful phase (which follows links
# from a created job to its other routes) leaves it out; its contract is tested in test_jobs.py.
stateful_schema = schemathesis.openapi.from_path(str(COMMITTED)).exclude(
    operation_id="streamJobEvents"
)


def test_stateful_sequences_cause_no_server_error(app: FastAPI) -> None:
    class Scenarios(stateful_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, object]:
            return {"app": app, "headers": bearer(ACME_KEY)}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
            case.validate_response(
                response,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            )

    # Bounded: a few short scenarios keep this to seconds on two cores.
    Scenarios.run(
        settings=hypothesis.settings(
            max_examples=10,
            stateful_step_count=5,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            derandomize=True,
            database=None,
        )
    )
