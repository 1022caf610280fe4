"""One router per resource; ``api_router`` includes them all."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import edits, files, health, jobs, models, syntheses

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(edits.router)
api_router.include_router(syntheses.router)
api_router.include_router(jobs.router)
api_router.include_router(models.router)
api_router.include_router(files.router)
api_router.include_router(health.router)
