"""The OpenAPI docs at /docs (Swagger UI) and /redoc (ReDoc), with no network needed.

Their scripts and styles come from the fastapi-offline package's files, served here, as
the dashboard serves plotly.js from the plotly package: nothing is fetched from a CDN, and
a Content-Security-Policy keeps both pages on this origin.
"""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from services.api.routes.dashboard import resource

router = APIRouter(include_in_schema=False)
ASSETS_URL = "/vendor/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# FastAPI's pages start the UIs with an inline script; ReDoc searches in a blob: worker.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none';"
    " base-uri 'none'; frame-ancestors 'none'"
)
# The one thing ReDoc's bundle fetches from elsewhere; without a source the page hides it.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def _openapi_url(request: Request) -> str:
    return str(request.scope.get("root_path", "")) + str(request.app.openapi_url)


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over this api's OpenAPI document."""
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        oauth2_redirect_url=OAUTH2_REDIRECT_URL,
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get(OAUTH2_REDIRECT_URL)
def swagger_ui_redirect() -> HTMLResponse:
    """Where Swagger UI's OAuth2 flow returns (FastAPI's page)."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """ReDoc over this api's OpenAPI document, without web fonts."""
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get(f"{ASSETS_URL}/redoc.standalone.js")
def redoc_js() -> Response:
    """ReDoc's bundle as the package ships it, less the address of its logo."""
    return Response(_redoc_bundle(), media_type="text/javascript; charset=utf-8")


@cache
def _redoc_bundle() -> bytes:
    bundle = resource("fastapi_offline", "static", "redoc.standalone.js").read_bytes()
    return bundle.replace(REDOC_LOGO, b"")


def install(app: FastAPI) -> None:
    """The docs pages and their assets; the app is made with docs_url=None, redoc_url=None."""
    app.include_router(router)
    assets = StaticFiles(directory=resource("fastapi_offline", "static"))
    app.mount(ASSETS_URL, assets, name="docs-assets")
