"""GET /playground: a page for trying every capability of the API in a browser.

The page is static (``service/playground/``: HTML, CSS and plain JavaScript modules, no build
step) and talks to the API like any other client, with the key the user types; the gateway only
serves the files. Nothing is loaded from elsewhere, so it works offline, and a Content Security
Policy holds the page to its own origin for scripts and API calls (images may come from the
object store's presigned URLs, which live on another origin with S3).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_PATH", "PAGE_PATH", "assets", "router"]

PAGE_PATH = "/playground"
ASSETS_PATH = "/playground/assets"
_FOLDER = files("service") / "playground"

# Scripts, styles and fetches only from the gateway; images also from presigned URLs (any
# origin, since the object store's address is the deployment's) and from the page's own data:
# and blob: URLs (uploaded photos, drawn masks).
_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; "
    "media-src 'self' blob: http: https:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
HEADERS = {"Content-Security-Policy": _POLICY, "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def assets() -> StaticFiles:
    """The page's scripts and styles, served under :data:`ASSETS_PATH`."""
    return StaticFiles(directory=str(_FOLDER))


@router.get(PAGE_PATH)
async def playground() -> FileResponse:
    return FileResponse(str(_FOLDER / "index.html"), media_type="text/html", headers=HEADERS)
