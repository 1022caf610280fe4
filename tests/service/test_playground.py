"""GET /playground: the page and its assets come from the gateway, with every test hook, and
nothing is loaded from another origin."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from masactrl_jobs.schema import MAX_LORAS

PAGE_FOLDER = Path(__file__).resolve().parents[2] / "service" / "playground"
# The hooks the issue fixes for outside end-to-end checks that are in the page itself; the
# script makes the others (target-prompt, result-image, preview-image, error), which the browser
# tests find.
STATIC_TESTIDS = {"api-key", "mode", "source-prompt", "image-input", "submit", "progress", "cancel"}


def test_the_page_is_served_without_a_key_under_a_strict_policy(client: TestClient) -> None:
    client.headers.pop("Authorization", None)
    page = client.get("/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src" not in policy
    testids = set(re.findall(r'data-testid="([^"]+)"', page.text))
    assert testids >= STATIC_TESTIDS
    modes = re.search(r'data-testid="mode">(.*?)</select>', page.text, re.S)
    assert modes is not None
    assert re.findall(r'<option value="(\w+)"', modes.group(1)) == ["edit", "synthesis", "sequence"]


def test_every_asset_the_page_names_is_served(client: TestClient) -> None:
    page = client.get("/playground").text
    assets = re.findall(r'(?:src|href)="(/playground/assets/[^"]+)"', page)
    assert {"/playground/assets/app.js", "/playground/assets/playground.css"} <= set(assets)
    scripts = {path.name for path in PAGE_FOLDER.glob("*.js")}
    for name in scripts:
        answer = client.get(f"/playground/assets/{name}")
        assert answer.status_code == 200
        assert "javascript" in answer.headers["content-type"]
    assert client.get("/playground/assets/nothing.js").status_code == 404


def test_the_page_loads_nothing_from_elsewhere_and_never_puts_the_key_in_a_url() -> None:
    sources = {path.name: path.read_text() for path in PAGE_FOLDER.iterdir()}
    for name, text in sources.items():
        # No CDN, no web font: the page works offline.
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), name
        assert "@import" not in text and "@font-face" not in text, name
    script = "".join(text for name, text in sources.items() if name.endswith(".js"))
    # The key travels in a header only: no URL of the page is built with it.
    assert "Authorization: `Bearer ${key}`" in sources["api.js"]
    assert "EventSource(" not in script


def test_the_playground_is_not_part_of_the_api_contract(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/playground")]


def test_the_page_stops_ticking_lora_adapters_at_the_apis_limit() -> None:
    # The page holds its own copy of the limit (it has no way to read the schema's): this is
    # what keeps the two equal.
    script = (PAGE_FOLDER / "app.js").read_text()
    limit = re.search(r"^const MAX_LORAS = (\d+);$", script, re.M)
    assert limit is not None
    assert int(limit.group(1)) == MAX_LORAS
