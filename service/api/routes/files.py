"""GET /v1/files/{key}: objects of the file:// storage backend, behind signed expiring URLs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from masactrl_jobs.storage import FileStorage, InvalidKey, content_type_for
from service.api.deps import GatewayDep
from service.api.responses import errors
from service.errors import ApiError

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get(
    "/{key:path}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The object's bytes.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **errors(403, 404, 422),
    },
)
async def download_file(
    key: str,
    gateway: GatewayDep,
    expires: Annotated[int, Query(description="Expiry, seconds since the epoch.")],
    signature: Annotated[str, Query(max_length=128, description="HMAC-SHA256, hex.")],
) -> FileResponse:
    """Download a stored object through a signed URL from a job's output (file storage only)."""
    storage = gateway.storage
    if not isinstance(storage, FileStorage):
        # With S3 the URLs point at the bucket; this route serves nothing.
        raise ApiError(404, "not_found", "Files are served by the object store, not here.")
    if not storage.verify(key, expires, signature):
        raise ApiError(403, "forbidden", "The signature is invalid or has expired.")
    try:
        path = storage.path_for(key)
    except InvalidKey:
        raise ApiError(404, "not_found", "No such file.") from None
    if not await run_in_threadpool(path.is_file):
        raise ApiError(404, "not_found", "No such file.")
    return FileResponse(
        path,
        media_type=content_type_for(key),
        # The URL is the credential: let the browser cache it, but no shared cache.
        headers={"Cache-Control": "private, max-age=300"},
    )
