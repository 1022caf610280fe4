"""POST /v1/syntheses: consistent synthesis from a source prompt and target prompts."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from masactrl_jobs.schema import JobKind, SynthesisCreate
from service.api.deps import DirectRoute, Submission, submission_openapi
from service.api.responses import errors, job_response, submitted_response
from service.errors import invalid, validation_details
from service.submission import submit

router = APIRouter(prefix="/v1/syntheses", tags=["syntheses"], route_class=DirectRoute)

_OPENAPI = submission_openapi(
    {"application/json": {"schema": {"$ref": "#/components/schemas/SynthesisCreate"}}}
)


@router.post(
    "",
    status_code=202,
    response_model=None,
    openapi_extra=_OPENAPI,
    responses={
        202: job_response("The job was accepted (queued).", headers=True),
        200: job_response("Idempotent replay: the job first created with this key.", True),
        **errors(401, 413, 422, 429, 503),
    },
)
async def create_synthesis(request: Request) -> Response:
    """Submit a consistent synthesis: a source image and one image per target prompt."""
    context = Submission.from_request(request)
    try:
        # pydantic parses the JSON itself: faster than decoding to Python objects first.
        body = SynthesisCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid(validation_details(exc.errors(), prefix=("body",))) from None
    submitted = await submit(
        context.gateway,
        context.tenant,
        JobKind.synthesis,
        body,
        idempotency_key=context.idempotency_key,
        prefer=context.prefer,
    )
    return submitted_response(context.gateway, submitted)
