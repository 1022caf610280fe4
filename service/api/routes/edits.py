"""POST /v1/edits: real-image edits, as JSON or as multipart with image file parts.

A multipart edit sends the photo as the ``image`` part and may send its condition images as
``condition_image`` parts, in target order; ``params.condition`` then names the condition model
and leaves out ``images``. The parts are validated and stored by the same intake rules as
references (``service.intake``).
"""

from __future__ import annotations

import json
from typing import BinaryIO

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from masactrl_jobs.images import payload_size, too_large_message
from masactrl_jobs.kinds.edit import EditFiles
from masactrl_jobs.schema import MAX_MASK_REGIONS, MAX_TARGETS, EditCreate, EditParams, JobKind
from service.api.deps import DirectRoute, Submission, submission_openapi
from service.api.responses import errors, job_response, submitted_response
from service.bodies import (
    is_json,
    load_json,
    parse_json,
    unsupported_media_type,
)
from service.config import GatewaySettings
from service.errors import FieldError, invalid
from service.middleware import FILE_PARTS, encoded_image_bytes
from service.submission import submit

router = APIRouter(prefix="/v1/edits", tags=["edits"], route_class=DirectRoute)

# The body is parsed by hand (two content types), so it is described here for the contract.
_OPENAPI = submission_openapi(
    JobKind.edit,
    {
        "application/json": {"schema": {"$ref": "#/components/schemas/EditCreate"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image", "params"],
                "properties": {
                    "image": {
                        "type": "string",
                        "format": "binary",
                        "description": "The image file (PNG, JPEG or WebP).",
                    },
                    "condition_image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "maxItems": MAX_TARGETS,
                        "description": "Condition image files (PNG, JPEG or WebP), one per "
                        "target prompt in order, or one for all; `params.condition` then names "
                        "the condition model and leaves out `images`.",
                    },
                    "params": {"$ref": "#/components/schemas/EditParams"},
                    "previews": {
                        "type": "string",
                        "enum": ["true", "false"],
                        "description": "Live previews (as `params.previews`; give one of the two).",
                    },
                },
            },
            "encoding": {"params": {"contentType": "application/json"}},
        },
    },
)
MULTIPART_PARTS = {"image", "condition_image", "params", "previews"}
# The reference each condition_image part stands for in ``params.condition.images`` while the
# params are validated; the submission reads the part's bytes in its place.
_PART_REF = "part:condition_image/{}"


def params_part_limit(settings: GatewaySettings) -> int:
    """The largest ``params`` part: the JSON limit, plus room for its inline masks."""
    masks = 2 * MAX_MASK_REGIONS * encoded_image_bytes(settings.max_image_bytes)
    return min(settings.max_json_bytes + masks, settings.max_request_bytes)


def _spooled_file(
    part: UploadFile, loc: tuple[str | int, ...], what: str, max_bytes: int
) -> BinaryIO:
    """The file the part was spooled to (on disk past 1 MiB), not read into memory: the intake
    validates and stores it from there."""
    size = part.size if part.size is not None else payload_size(part.file)
    if size > max_bytes:
        # The body limit lets a little more than max_bytes through; name the real size.
        raise FieldError(loc, too_large_message(what, size, max_bytes), "invalid_image")
    return part.file


def _with_part_refs(params_text: bytes | str, parts: int) -> bytes | str:
    """The params with ``condition.images`` standing for ``parts`` condition_image parts."""
    try:
        params = load_json(params_text)
    except ValueError:
        return params_text  # parse_json names the JSON error or the duplicate key
    condition = params.get("condition") if isinstance(params, dict) else None
    if not isinstance(condition, dict):
        raise invalid(
            [
                FieldError(
                    ("body", "params", "condition"),
                    "condition_image parts need a condition in params naming its model",
                    "missing",
                )
            ]
        )
    if "images" in condition:
        raise invalid(
            [
                FieldError(
                    ("body", "params", "condition", "images"),
                    "send the condition images either as condition_image parts or in "
                    "params.condition.images, not both",
                    "conflicting_condition_images",
                )
            ]
        )
    condition["images"] = [_PART_REF.format(i) for i in range(parts)]
    return json.dumps(params)


def _with_previews_field(params: EditParams, values: list[UploadFile | str]) -> EditParams:
    """``params`` with the ``previews`` form field applied: ``true`` or ``false``, sent once, and
    not also in ``params`` (an HTML form sends the field; a JSON client may use either)."""
    if not values:
        return params
    loc = ("body", "previews")
    if len(values) > 1:
        raise invalid([FieldError(loc, "send the previews field once", "too_many_parts")])
    value = values[0]
    if not isinstance(value, str) or value not in ("true", "false"):
        raise invalid([FieldError(loc, "previews must be true or false", "bool_parsing")])
    if "previews" in params.model_fields_set:
        message = "give previews once: as the form field or in params, not both"
        raise invalid([FieldError(loc, message, "duplicate")])
    return params.model_copy(update={"previews": value == "true"})


async def _parse_multipart(
    request: Request, settings: GatewaySettings
) -> tuple[EditParams, EditFiles]:
    max_bytes = settings.max_image_bytes
    try:
        # File parts are spooled to disk past 1 MiB; the params part is held in memory, so it
        # gets its own limit (the middleware bounds the body as a whole).
        form = await request.form(
            # The image file parts, and params, which clients may send as a file too.
            max_files=FILE_PARTS[("POST", "/v1/edits")] + 1,
            max_fields=4,
            max_part_size=params_part_limit(settings),
        )
    except MultiPartException as exc:
        raise invalid([FieldError(("body",), f"malformed multipart body: {exc.message}")]) from None
    except StarletteHTTPException as exc:  # Starlette's limits on parts and fields
        raise invalid([FieldError(("body",), f"multipart body refused: {exc.detail}")]) from None
    unknown = sorted(set(form.keys()) - MULTIPART_PARTS)
    if unknown:
        raise invalid(
            [FieldError(("body", unknown[0]), f"unknown part {unknown[0]!r}", "extra_forbidden")]
        )
    if len(form.getlist("image")) > 1:
        raise invalid([FieldError(("body", "image"), "send one image part", "too_many_parts")])
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise invalid([FieldError(("body", "image"), "send the image as a file part", "missing")])
    raw_params = form.get("params")
    if raw_params is None:
        raise invalid([FieldError(("body", "params"), "this part is required", "missing")])
    params_text = await raw_params.read() if isinstance(raw_params, UploadFile) else raw_params
    condition_parts = form.getlist("condition_image")
    for i, part in enumerate(condition_parts):
        if not isinstance(part, UploadFile):
            loc = ("body", "condition_image", i)
            raise invalid([FieldError(loc, "send each condition image as a file part", "invalid")])
    if condition_parts:
        params_text = _with_part_refs(params_text, len(condition_parts))
    params = parse_json(EditParams, params_text, prefix=("body", "params"))
    params = _with_previews_field(params, form.getlist("previews"))
    image_file = _spooled_file(image, ("body", "image"), "image", max_bytes)
    conditions = [
        _spooled_file(part, ("body", "condition_image", i), "condition image", max_bytes)
        for i, part in enumerate(condition_parts)
        if isinstance(part, UploadFile)
    ]
    return params, EditFiles(image_file, conditions)


_SUMMARY = "Submit a real-image edit (JSON with an image URL, or multipart with an image file)."


@router.post(
    "",
    status_code=202,
    response_model=None,
    openapi_extra=_OPENAPI,
    description=_SUMMARY,
    responses={
        202: job_response("The job was accepted (queued).", headers=True),
        200: job_response("Idempotent replay: the job first created with this key.", True),
        **errors(401, 413, 415, 422, 429, 503),
    },
)
async def create_edit(request: Request) -> Response:
    """The route of _SUMMARY; its OpenAPI description adds the kind's rules."""
    context = Submission.from_request(request)
    content_type = context.media_type
    files: EditFiles | None = None
    try:
        if is_json(content_type):
            body: EditCreate | EditParams = parse_json(EditCreate, await request.body())
        elif content_type == "multipart/form-data":
            body, files = await _parse_multipart(request, context.gateway.settings)
        else:
            raise unsupported_media_type(
                "application/json, or multipart/form-data with 'image' and 'params' parts "
                "(and optional 'condition_image' parts)"
            )
        submitted = await submit(
            context.gateway,
            context.tenant,
            JobKind.edit,
            body,
            files=files,
            idempotency_key=context.idempotency_key,
            prefer=context.prefer,
        )
    finally:
        # The parts' spooled files go now, not when the request object is collected.
        await request.close()
    return submitted_response(context.gateway, submitted)
