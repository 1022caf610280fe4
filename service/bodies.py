"""Reading JSON request bodies: the content-type rule, duplicate keys, and the model's checks.

Both submission routes read their bodies through here, so one rule decides what counts as JSON
and a key given twice is refused rather than silently taking the last value.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from service.errors import ApiError, FieldError, Loc, invalid, validation_details

__all__ = [
    "is_json",
    "load_json",
    "media_type",
    "parse_json",
    "refuse_duplicates",
    "unsupported_media_type",
]

Model = TypeVar("Model", bound=BaseModel)


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, lowercase, without parameters."""
    return (content_type or "").split(";")[0].strip().lower()


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
    # dict() in C, then a count: the pairs are searched for the key only when one came twice.
    seen = dict(pairs)
    if len(seen) != len(pairs):
        names: set[str] = set()
        for key, _ in pairs:
            if key in names:
                raise _DuplicateKey(key)
            names.add(key)
    return seen


# Built once: json.loads with a hook builds a new decoder (and scanner) on every call.
_decode = json.JSONDecoder(object_pairs_hook=refuse_duplicates).decode


def load_json(raw: bytes | str) -> Any:
    """``json.loads(raw, object_pairs_hook=refuse_duplicates)``, without its per-call set-up."""
    # A body opening with "{" and a non-zero byte is UTF-8 to json.loads (no BOM, not UTF-16 or
    # 32), which it decodes as here; anything else takes json.loads' own encoding detection.
    if isinstance(raw, bytes) and raw[:1] == b"{" and raw[1:2] != b"\x00":
        return _decode(raw.decode("utf-8", "surrogatepass"))
    if isinstance(raw, str) and raw[:1] == "{":
        return _decode(raw)
    return json.loads(raw, object_pairs_hook=refuse_duplicates)


def parse_json(model: type[Model], raw: bytes | str, prefix: Loc = ("body",)) -> Model:
    """``raw`` validated as ``model``; 422 for invalid JSON, a duplicate key or a bad field."""
    try:
        load_json(raw)
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
