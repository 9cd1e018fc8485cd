"""The live dashboard at `/`: static files of this package and the plotly.js that plotly ships."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)
STATIC_URL = "/static"
PLOTLY_URL = "/vendor/plotly.min.js"
# The page only talks to this api: scripts, styles, fetches and sockets from its own origin.
# Plotly sets inline styles on its SVG, hence 'unsafe-inline' for styles (not for scripts).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def resource(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package (pip installs packages as plain files)."""
    return Path(str(files(package).joinpath(*parts)))


STATIC_DIR = resource("services.api", "static")


@router.get("/")
def home() -> FileResponse:
    """The dashboard page; the OpenAPI docs stay at /docs."""
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)


@router.get(PLOTLY_URL)
def plotly_js() -> FileResponse:
    """plotly.js from the plotly Python package: it arrives with the install, not from a CDN."""
    path = resource("plotly", "package_data", "plotly.min.js")
    return FileResponse(path, media_type="text/javascript; charset=utf-8")


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
