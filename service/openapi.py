"""Print the gateway's OpenAPI document: ``python -m service.openapi > openapi/openapi.json``.

The schema does not depend on settings, so a throwaway development configuration is used and no
Redis or storage is contacted.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

__all__ = ["openapi_document", "render"]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of an app built with placeholder development settings."""
    from service.config import GatewaySettings
    from service.main import create_app

    with tempfile.TemporaryDirectory() as storage:
        settings = GatewaySettings(
            _env_file=None,
            environment="development",
            dev_api_key="openapi-only",
            url_signing_secret="openapi-only-not-a-real-secret-0123456789",
            storage_url=f"file://{storage}",
            catalog=None,
            catalog_file=None,
        )
        return create_app(settings).openapi()


def render(document: dict[str, Any]) -> str:
    """The committed text form: indented, key order as generated, trailing newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(openapi_document()))
