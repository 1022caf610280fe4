"""The gateway's OpenAPI document: ``python -m service.openapi --output openapi/openapi.json``
(``--check`` says whether the committed file is current; ``--help`` lists the options).

The document is the default deployment's: the default catalog, whose models the submission
routes' rules list, and the default limits they state (``service.api.contract``), whatever
``MASACTRL_*`` variables are set. A throwaway development configuration is used and no Redis or
storage is contacted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["headers_without_null", "openapi_document", "render"]


def headers_without_null(document: dict[str, Any]) -> None:
    """Drop ``null`` from header parameters' schemas, in place.

    FastAPI documents an optional header (``str | None``) as ``anyOf: [string, null]``, but a
    header cannot be null: it is a string or absent. A client (or schemathesis) that believes
    the document sends the text ``null``, which the route then refuses.
    """
    for path in document.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                schema = parameter.get("schema", {})
                if parameter.get("in") != "header" or "anyOf" not in schema:
                    continue
                kept = [s for s in schema["anyOf"] if s != {"type": "null"}]
                if len(kept) == 1:
                    rest = {k: v for k, v in schema.items() if k != "anyOf"}
                    parameter["schema"] = {**kept[0], **rest}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of an app built with placeholder development settings."""
    from pydantic_core import PydanticUndefined

    from service.config import GatewaySettings
    from service.main import create_app

    # Every setting with a plain default at that default, so no variable of the environment
    # changes a limit the rules state.
    defaults = {
        name: field.default
        for name, field in GatewaySettings.model_fields.items()
        if field.default is not PydanticUndefined and field.default_factory is None
    }
    with tempfile.TemporaryDirectory() as storage:
        settings = GatewaySettings(
            _env_file=None,
            **{
                **defaults,
                "environment": "development",
                "dev_api_key": "openapi-only",
                "url_signing_secret": "openapi-only-not-a-real-secret-0123456789",
                "storage_url": f"file://{storage}",
                "catalog": None,
                "catalog_file": None,
            },
        )
        return create_app(settings).openapi()


def render(document: dict[str, Any]) -> str:
    """The committed text form: indented, key order as generated, trailing newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document to stdout or ``--output``, or ``--check`` a file against it."""
    parser = argparse.ArgumentParser(
        prog="python -m service.openapi", description="The gateway's OpenAPI document."
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("-o", "--output", type=Path, help="write it to this file (default: stdout)")
    target.add_argument(
        "--check",
        type=Path,
        metavar="FILE",
        help="exit 1 if FILE (e.g. openapi/openapi.json) differs from it",
    )
    args = parser.parse_args(argv)
    text = render(openapi_document())
    if args.check is not None:
        if args.check.read_text(encoding="utf-8") == text:
            return 0
        print(
            f"{args.check} is stale; regenerate it with "
            f"`python -m service.openapi --output {args.check}`",
            file=sys.stderr,
        )
        return 1
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
