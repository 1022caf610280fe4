"""One router per resource; the app includes each of :data:`ROUTERS`."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import (
    docs,
    edits,
    files,
    health,
    jobs,
    models,
    playground,
    sequences,
    syntheses,
)

__all__ = ["ROUTERS"]

# Included one by one, not through an umbrella router: every nesting level is another round of
# route matching on every request.
ROUTERS: tuple[APIRouter, ...] = (
    syntheses.router,
    edits.router,
    sequences.router,
    jobs.router,
    models.router,
    files.router,
    health.router,
    docs.router,
    playground.router,
)
