"""POST /v1/edits: real-image edits, as JSON or as multipart with an image file part."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from masactrl_jobs.images import too_large_message
from masactrl_jobs.schema import MAX_MASK_REGIONS, EditCreate, EditParams, JobKind
from service.api.deps import CROSS_FIELD_RULES, DirectRoute, Submission, submission_openapi
from service.api.responses import errors, job_response, submitted_response
from service.bodies import is_json, media_type, parse_json, unsupported_media_type
from service.config import GatewaySettings
from service.errors import FieldError, invalid
from service.middleware import encoded_image_bytes
from service.submission import submit

router = APIRouter(prefix="/v1/edits", tags=["edits"], route_class=DirectRoute)

# The body is parsed by hand (two content types), so it is described here for the contract.
_OPENAPI = submission_openapi(
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
                    "params": {"$ref": "#/components/schemas/EditParams"},
                },
            },
            "encoding": {"params": {"contentType": "application/json"}},
        },
    }
)
MULTIPART_PARTS = {"image", "params"}


def params_part_limit(settings: GatewaySettings) -> int:
    """The largest ``params`` part: the JSON limit, plus room for its inline masks."""
    masks = 2 * MAX_MASK_REGIONS * encoded_image_bytes(settings.max_image_bytes)
    return min(settings.max_json_bytes + masks, settings.max_request_bytes)


async def _parse_multipart(request: Request, settings: GatewaySettings) -> tuple[EditParams, bytes]:
    max_bytes = settings.max_image_bytes
    try:
        # The image part is spooled to disk past 1 MiB; the params part is held in memory, so it
        # gets its own limit (the middleware bounds the body as a whole).
        form = await request.form(
            max_files=2, max_fields=4, max_part_size=params_part_limit(settings)
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
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise invalid([FieldError(("body", "image"), "send the image as a file part", "missing")])
    raw_params = form.get("params")
    if raw_params is None:
        raise invalid([FieldError(("body", "params"), "this part is required", "missing")])
    params_text = await raw_params.read() if isinstance(raw_params, UploadFile) else raw_params
    params = parse_json(EditParams, params_text, prefix=("body", "params"))
    if image.size is not None and image.size > max_bytes:
        # The body limit lets a little more than max_bytes through; name the real size.
        raise FieldError(
            ("body", "image"), too_large_message("image", image.size, max_bytes), "invalid_image"
        )
    # Read one byte past the limit: enough to know it is too large without holding more.
    data = await image.read(max_bytes + 1)
    return params, data


_SUMMARY = "Submit a real-image edit (JSON with an image URL, or multipart with an image file)."


@router.post(
    "",
    status_code=202,
    response_model=None,
    openapi_extra=_OPENAPI,
    description=_SUMMARY + CROSS_FIELD_RULES,
    responses={
        202: job_response("The job was accepted (queued).", headers=True),
        200: job_response("Idempotent replay: the job first created with this key.", True),
        **errors(401, 413, 415, 422, 429, 503),
    },
)
async def create_edit(request: Request) -> Response:
    """The route of _SUMMARY; its OpenAPI description adds the cross-field rules."""
    context = Submission.from_request(request)
    content_type = media_type(request)
    if is_json(content_type):
        body: EditCreate | EditParams = parse_json(EditCreate, await request.body())
        upload = None
    elif content_type == "multipart/form-data":
        body, upload = await _parse_multipart(request, context.gateway.settings)
    else:
        raise unsupported_media_type(
            "application/json, or multipart/form-data with 'image' and 'params' parts"
        )
    submitted = await submit(
        context.gateway,
        context.tenant,
        JobKind.edit,
        body,
        upload=upload,
        idempotency_key=context.idempotency_key,
        prefer=context.prefer,
    )
    return submitted_response(context.gateway, submitted)
