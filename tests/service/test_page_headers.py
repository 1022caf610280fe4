"""HTML pages carry nosniff, no-referrer and a CSP that forbids framing; API answers are left as
they are."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.page_headers import with_frame_ancestors


@pytest.mark.parametrize(
    "page", ["/playground", "/docs", "/redoc", "/playground/assets/index.html"]
)
def test_every_html_page_gets_the_hardening_headers(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    policy = response.headers["content-security-policy"]
    assert policy.count("frame-ancestors") == 1 and "frame-ancestors 'none'" in policy


def test_the_playground_keeps_its_own_policy(client: TestClient) -> None:
    policy = client.get("/playground").headers["content-security-policy"]
    assert policy.startswith("default-src 'self'; img-src 'self' data: blob: http: https:;")
    assert "object-src 'none'" in policy and "form-action 'none'" in policy


def test_api_answers_are_untouched(client: TestClient) -> None:
    response = client.get("/livez")
    assert response.headers["content-type"] == "application/json"
    for name in ("referrer-policy", "content-security-policy"):
        assert name not in response.headers


def test_frame_ancestors_is_merged_into_a_policy() -> None:
    assert with_frame_ancestors(None) == "frame-ancestors 'none'"
    assert with_frame_ancestors(" ; ") == "frame-ancestors 'none'"
    assert (
        with_frame_ancestors("default-src 'self'; img-src data:;")
        == "default-src 'self'; img-src data:; frame-ancestors 'none'"
    )
    # A page that chose its framers keeps its choice.
    own = "default-src 'self'; Frame-Ancestors https://example.test"
    assert with_frame_ancestors(own) == own
