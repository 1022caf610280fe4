"""Probes (/livez, /readyz: never authenticated) and /metrics (see ops_token), outside /v1."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from masactrl_jobs.schema import ErrorBody
from service.api.deps import GatewayDep, OpsAccess

router = APIRouter(tags=["health"])
logger = logging.getLogger(__name__)

_PROBE_TIMEOUT = 3.0


@router.get("/livez", responses={200: {"description": "The process is serving."}})
async def livez() -> dict[str, str]:
    """Liveness: the process answers (no dependency is checked)."""
    return {"status": "ok"}


async def _check_redis(gateway: GatewayDep) -> bool:
    try:
        return await asyncio.wait_for(gateway.store.ping(), _PROBE_TIMEOUT)
    except Exception as exc:
        logger.warning("readiness: Redis unreachable: %s", exc)
        return False


async def _check_storage(gateway: GatewayDep) -> bool:
    try:
        return bool(
            await asyncio.wait_for(run_in_threadpool(gateway.storage.healthy), _PROBE_TIMEOUT)
        )
    except Exception as exc:
        logger.warning("readiness: storage unreachable: %s", exc)
        return False


@router.get(
    "/readyz",
    responses={
        200: {"description": "Redis and storage are reachable."},
        503: {"description": "A dependency is unreachable; the body says which."},
    },
)
async def readyz(gateway: GatewayDep) -> JSONResponse:
    """Readiness: Redis and object storage both answer."""
    redis_ok, storage_ok = await asyncio.gather(_check_redis(gateway), _check_storage(gateway))
    checks = {
        "redis": "ok" if redis_ok else "unreachable",
        "storage": "ok" if storage_ok else "unreachable",
    }
    ready = redis_ok and storage_ok
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        401: {
            "model": ErrorBody,
            "description": "MASACTRL_OPS_TOKEN is set and the request does not carry it.",
        },
    },
    # The operations token is optional: with MASACTRL_OPS_TOKEN unset the route is open. FastAPI
    # writes the OpsToken requirement; the empty alternative says "or no credentials".
    openapi_extra={"security": [{}]},
)
async def metrics(gateway: GatewayDep, _: OpsAccess) -> Response:
    """Prometheus metrics: requests, latencies, submitted jobs, queue depth per model, queued
    jobs by tenant and priority, expirations.

    Open unless the gateway sets `MASACTRL_OPS_TOKEN`; then `Authorization: Bearer <ops
    token>` is required (`401` without it). Never an API key's route.
    """
    try:
        depths = await gateway.store.queue_depths(gateway.catalog.names())
    except Exception as exc:  # the HTTP metrics are still worth scraping while Redis is down
        logger.warning("metrics: queue depth unavailable: %s", exc)
    else:
        for model, depth in depths.items():
            gateway.metrics.queue_depth.labels(model).set(depth)
    try:
        queued, expired = await gateway.store.queue_census(gateway.catalog.names())
    except Exception as exc:
        logger.warning("metrics: queue census unavailable: %s", exc)
    else:
        # Only what is queued now: tenants and priorities that emptied leave the gauge.
        gateway.metrics.queued.clear()
        for (model, tenant, priority), n in queued.items():
            gateway.metrics.queued.labels(model, tenant, str(priority)).set(n)
        for model, n in expired.items():
            gateway.metrics.expired.labels(model).set(n)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
