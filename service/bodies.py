"""Reading JSON request bodies: the content-type rule, duplicate keys, and the model's checks.

Both submission routes read their bodies through here, so one rule decides what counts as JSON
and a key given twice is refused rather than silently taking the last value.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from service.errors import ApiError, FieldError, Loc, invalid, validation_details

__all__ = ["is_json", "media_type", "parse_json", "refuse_duplicates", "unsupported_media_type"]

Model = TypeVar("Model", bound=BaseModel)


def media_type(request: Request) -> str:
    """The request's media type, lowercase, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(kind: str) -> bool:
    """``application/json`` or a ``+json`` type: what a JSON body must be sent as."""
    return kind == "application/json" or kind.endswith("+json")


def unsupported_media_type(accepted: str) -> ApiError:
    """415 naming what the route accepts."""
    return ApiError(415, "unsupported_media_type", f"Send {accepted}.")


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` object hook: a ValueError for a key given twice (JSON allows it)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_json(model: type[Model], raw: bytes | str, prefix: Loc = ("body",)) -> Model:
    """``raw`` validated as ``model``; 422 for invalid JSON, a duplicate key or a bad field."""
    try:
        json.loads(raw, object_pairs_hook=refuse_duplicates)
    except _DuplicateKey as exc:
        raise invalid(
            [FieldError((*prefix, exc.key), f"key {exc.key!r} is given twice", "duplicate_key")]
        ) from None
    except ValueError:
        pass  # not JSON at all: pydantic's error below says where
    try:
        # pydantic parses the JSON itself, in strict mode: "6" and true are not numbers.
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid(validation_details(exc.errors(), prefix=prefix)) from None
