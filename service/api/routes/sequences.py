"""POST /v1/sequences: K consistent frames from one source and K condition frames or a video.

JSON names every input by reference; multipart sends a ``params`` part (``SequenceParams``) and
the files: ``frame`` parts in order (the same name repeated), or one ``video`` part, and an
optional ``image`` part as the source.
"""

from __future__ import annotations

from typing import BinaryIO

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from masactrl_jobs.images import payload_size, too_large_message
from masactrl_jobs.kinds.sequence import SequenceFiles
from masactrl_jobs.schema import JobKind, SequenceCreate, SequenceParams
from service.api.deps import DirectRoute, Submission, submission_openapi
from service.api.responses import errors, job_response, submitted_response
from service.bodies import is_json, parse_json, unsupported_media_type
from service.config import GatewaySettings
from service.errors import FieldError, invalid
from service.submission import submit

router = APIRouter(prefix="/v1/sequences", tags=["sequences"], route_class=DirectRoute)

_FILE = {"type": "string", "format": "binary"}
_OPENAPI = submission_openapi(
    JobKind.sequence,
    {
        "application/json": {"schema": {"$ref": "#/components/schemas/SequenceCreate"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["params"],
                "properties": {
                    "params": {"$ref": "#/components/schemas/SequenceParams"},
                    "frame": {
                        "type": "array",
                        "items": _FILE,
                        "description": "The condition frames in order (PNG, JPEG or WebP).",
                    },
                    "video": {**_FILE, "description": "A video whose frames are the conditions."},
                    "image": {**_FILE, "description": "A photo as the source (inverted)."},
                },
            },
            "encoding": {"params": {"contentType": "application/json"}},
        },
    },
)
_PARTS = {"params", "frame", "video", "image"}


def _file(part: UploadFile, loc: tuple[str | int, ...], what: str, limit: int) -> BinaryIO:
    """The file the part was spooled to (on disk past 1 MiB), never read into memory: a video
    is probed and stored from files (service/intake.py)."""
    size = part.size if part.size is not None else payload_size(part.file)
    if size > limit:
        raise FieldError(loc, too_large_message(what, size, limit), "too_large")
    return part.file


async def _parse_multipart(
    request: Request, settings: GatewaySettings
) -> tuple[SequenceParams, SequenceFiles]:
    try:
        form = await request.form(
            max_files=settings.max_sequence_frames + 2,
            max_fields=4,
            max_part_size=settings.max_json_bytes,
        )
    except MultiPartException as exc:
        raise invalid([FieldError(("body",), f"malformed multipart body: {exc.message}")]) from None
    except StarletteHTTPException as exc:  # Starlette's limits on parts and fields
        raise invalid([FieldError(("body",), f"multipart body refused: {exc.detail}")]) from None
    unknown = sorted(set(form.keys()) - _PARTS)
    if unknown:
        raise invalid(
            [FieldError(("body", unknown[0]), f"unknown part {unknown[0]!r}", "extra_forbidden")]
        )
    raw_params = form.get("params")
    if raw_params is None:
        raise invalid([FieldError(("body", "params"), "this part is required", "missing")])
    params_text = await raw_params.read() if isinstance(raw_params, UploadFile) else raw_params
    params = parse_json(SequenceParams, params_text, prefix=("body", "params"))
    for name in ("video", "image"):
        if len(form.getlist(name)) > 1:
            raise invalid([FieldError(("body", name), f"send at most one {name!r} part")])
    frames = []
    for k, frame in enumerate(form.getlist("frame")):
        if not isinstance(frame, UploadFile):
            raise invalid([FieldError(("body", "frame", k), "send each frame as a file part")])
        limit = settings.max_image_bytes
        frames.append(_file(frame, ("body", "frame", k), "condition frame", limit))
    files: dict[str, BinaryIO | None] = {}
    for name, what, limit in (
        ("video", "video", settings.max_video_bytes),
        ("image", "image", settings.max_image_bytes),
    ):
        part = form.get(name)
        if part is not None and not isinstance(part, UploadFile):
            raise invalid([FieldError(("body", name), f"send the {what} as a file part")])
        files[name] = None if part is None else _file(part, ("body", name), what, limit)
    return params, SequenceFiles(frames, files["video"], files["image"])


_SUMMARY = (
    "Submit a sequence: consistent frames from one source (a prompt or a photo) and condition "
    "frames or a video (JSON with references, or multipart with file parts)."
)


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
async def create_sequence(request: Request) -> Response:
    """The route of _SUMMARY; its OpenAPI description adds the kind's rules."""
    context = Submission.from_request(request)
    content_type = context.media_type
    files: SequenceFiles | None = None
    try:
        if is_json(content_type):
            body: SequenceParams = parse_json(SequenceCreate, await request.body())
        elif content_type == "multipart/form-data":
            body, files = await _parse_multipart(request, context.gateway.settings)
        else:
            raise unsupported_media_type(
                "application/json, or multipart/form-data with a 'params' part and 'frame' or "
                "'video' parts"
            )
        submitted = await submit(
            context.gateway,
            context.tenant,
            JobKind.sequence,
            body,
            idempotency_key=context.idempotency_key,
            prefer=context.prefer,
            files=files,
        )
    finally:
        # The parts' spooled files go now, not when the request object is collected.
        await request.close()
    return submitted_response(context.gateway, submitted)
