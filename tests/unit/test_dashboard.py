"""The dashboard's files are served by the api itself and reach for nothing outside it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.routes.dashboard import STATIC_DIR, resource
from services.runtime import build_api
from shared.settings import Settings

PAGE_FILES = ("index.html", "app.js", "app.css")
EXTERNAL = re.compile(r"\b(?:https?|wss?|ftp)://", re.IGNORECASE)


class References(HTMLParser):
    """Every `src` and `href` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[TestClient]:
    context, _ = build_api(sqlite_settings, with_projector=False)
    with TestClient(create_app(context)) as client:
        yield client


def test_the_page_is_served_at_the_root(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert 'href="/docs"' in response.text
    assert "/" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/static/app.js", "text/javascript"),
        ("/static/app.css", "text/css"),
        ("/vendor/plotly.min.js", "text/javascript"),
    ],
)
def test_static_files_and_plotly_are_served(
    client: TestClient, path: str, content_type: str
) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert len(response.content) > 1000


def test_plotly_is_the_bundle_the_plotly_package_ships(client: TestClient) -> None:
    bundle = resource("plotly", "package_data", "plotly.min.js").read_bytes()
    assert client.get("/vendor/plotly.min.js").content == bundle
    assert b"newPlot" in bundle


def test_every_reference_of_the_page_resolves_on_the_api(client: TestClient) -> None:
    parser = References()
    parser.feed(client.get("/").text)
    assert "/vendor/plotly.min.js" in parser.urls and "/static/app.js" in parser.urls
    for url in parser.urls:
        if url.startswith("data:"):
            continue  # inline, fetches nothing
        assert url.startswith("/") and not url.startswith("//"), url
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("name", PAGE_FILES)
def test_the_page_names_no_url_outside_the_api(name: str) -> None:
    text = (STATIC_DIR / name).read_text()
    assert EXTERNAL.findall(text) == []


def test_unknown_static_files_are_a_clean_404(client: TestClient) -> None:
    for path in ("/static/missing.js", "/static/../app.py", "/static/%2e%2e/deps.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("application/json")
