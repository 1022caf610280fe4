"""POST /v1/syntheses: consistent synthesis from a source prompt and target prompts."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from masactrl_jobs.schema import JobKind, SynthesisCreate
from service.api.deps import DirectRoute, Submission, submission_openapi
from service.api.responses import errors, job_response, submitted_response
from service.bodies import is_json, parse_json, unsupported_media_type
from service.submission import submit

router = APIRouter(prefix="/v1/syntheses", tags=["syntheses"], route_class=DirectRoute)

_OPENAPI = submission_openapi(
    JobKind.synthesis,
    {"application/json": {"schema": {"$ref": "#/components/schemas/SynthesisCreate"}}},
)

_SUMMARY = "Submit a consistent synthesis: a source image and one image per target prompt."


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
async def create_synthesis(request: Request) -> Response:
    """The route of _SUMMARY; its OpenAPI description adds the kind's rules."""
    context = Submission.from_request(request)
    if not is_json(context.media_type):
        raise unsupported_media_type("application/json")
    body = parse_json(SynthesisCreate, await request.body())
    submitted = await submit(
        context.gateway,
        context.tenant,
        JobKind.synthesis,
        body,
        idempotency_key=context.idempotency_key,
        prefer=context.prefer,
    )
    return submitted_response(context.gateway, submitted)
