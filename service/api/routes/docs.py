"""The API's own description: /openapi.json, Swagger UI at /docs and ReDoc at /redoc.

The pages load their scripts and styles from the gateway itself (``/docs-assets``, the files the
``fastapi-offline`` package ships), never from a CDN, so they work on a machine that is offline.
With ``MASACTRL_OPS_TOKEN`` set these routes, like /metrics, need that token as a bearer.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from service.api.deps import OpsAccess

__all__ = ["ASSETS_PATH", "assets", "router"]

ASSETS_PATH = "/docs-assets"
_TITLE = "MasaCtrl API"

router = APIRouter(include_in_schema=False)


def assets() -> StaticFiles:
    """The Swagger UI and ReDoc files, served under :data:`ASSETS_PATH`."""
    return StaticFiles(directory=str(files("fastapi_offline") / "static"))


@router.get("/openapi.json")
async def openapi_document(request: Request, _: OpsAccess) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(_: OpsAccess) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{_TITLE} – Swagger UI",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
    )


@router.get("/redoc")
async def redoc(_: OpsAccess) -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=f"{_TITLE} – ReDoc",
        redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )
