"""POST /v1/syntheses: consistent synthesis from a source prompt and target prompts."""

from __future__ import annotations

from fastapi import APIRouter, Response

from masactrl_jobs.schema import JobKind, SynthesisCreate
from service.api.deps import GatewayDep, IdempotencyKey, Prefer, TenantDep
from service.api.responses import errors, job_response
from service.submission import submit

router = APIRouter(prefix="/v1/syntheses", tags=["syntheses"])


@router.post(
    "",
    status_code=202,
    response_model=None,
    responses={
        202: job_response("The job was accepted (queued).", headers=True),
        200: job_response("Idempotent replay: the job first created with this key.", True),
        **errors(401, 413, 422, 429, 503),
    },
)
async def create_synthesis(
    body: SynthesisCreate,
    gateway: GatewayDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> Response:
    """Submit a consistent synthesis: a source image and one image per target prompt."""
    return await submit(
        gateway, tenant, JobKind.synthesis, body, idempotency_key=idempotency_key, prefer=prefer
    )
