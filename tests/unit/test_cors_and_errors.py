"""CORS from the configured origins only, and no database text in any error a client sees."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.runtime import build_api
from shared.settings import Settings

API = "/api/v1/training"
FRONTEND = "https://heimdall.example.org"


def app_client(settings: Settings, **update: object) -> TestClient:
    configured = Settings.model_validate({**settings.model_dump(), **update})
    context, background = build_api(configured, with_projector=True)  # commands await it
    return TestClient(create_app(context, background), raise_server_exceptions=False)


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[TestClient]:
    with app_client(sqlite_settings, cors_origins=f"{FRONTEND},http://localhost:5173") as c:
        yield c


def test_a_listed_origin_gets_its_preflight_and_response_headers(client: TestClient) -> None:
    preflight = client.options(
        f"{API}/jobs",
        headers={
            "Origin": FRONTEND,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == FRONTEND
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    response = client.get(f"{API}/jobs", headers={"Origin": FRONTEND})
    assert response.headers["access-control-allow-origin"] == FRONTEND


def test_another_origin_gets_no_cors_headers(client: TestClient) -> None:
    evil = "https://evil.example.com"
    preflight = client.options(
        f"{API}/jobs", headers={"Origin": evil, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    response = client.get(f"{API}/jobs", headers={"Origin": evil})
    assert "access-control-allow-origin" not in response.headers


def test_without_origins_there_is_no_cors_at_all(sqlite_settings: Settings) -> None:
    with app_client(sqlite_settings) as c:
        response = c.get(f"{API}/jobs", headers={"Origin": FRONTEND})
    assert "access-control-allow-origin" not in response.headers


def test_a_database_error_never_reaches_the_client(sqlite_settings: Settings) -> None:
    with app_client(sqlite_settings) as c:
        reads = sqlite3.connect(sqlite_settings.data_dir / "read.sqlite")
        reads.execute("DROP TABLE training_jobs")
        reads.close()
        response = c.get(f"{API}/jobs", params={"status": "queued"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    for leak in ("training_jobs", "SELECT", "no such table", "Traceback", "sqlite"):
        assert leak not in response.text


def test_sql_in_input_is_only_data(sqlite_settings: Settings) -> None:
    """Every value goes to the database as a bound parameter; identifiers are validated."""
    name, description = "x'); DROP TABLE training_jobs; --", '" OR 1=1 --'
    context, background = build_api(sqlite_settings, with_projector=True)
    with TestClient(create_app(context, background)) as c:
        body = {"job_name": name, "description": description}
        assert c.post(f"{API}/jobs", json=body).status_code == 201
        deadline = time.monotonic() + 10
        while not (jobs := c.get(f"{API}/jobs").json()["jobs"]):
            assert time.monotonic() < deadline, "never projected"
            time.sleep(0.02)
        assert [(j["job_name"], j["description"]) for j in jobs] == [(name, description)]
        injected = c.get(f"{API}/jobs", params={"status": "queued' OR '1'='1"})
        assert injected.status_code == 422
    with pytest.raises(ValueError, match="database_schema"):
        Settings(database_schema='public"; DROP SCHEMA public CASCADE; --', _env_file=None)


def test_a_locked_sqlite_read_store_is_a_503_not_a_500(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.readmodel import sqlite as read_sqlite

    with app_client(sqlite_settings) as client:
        monkeypatch.setattr(read_sqlite, "LOCK_WAIT_SECONDS", 0.2)
        holder = sqlite3.connect(sqlite_settings.data_dir / "read.sqlite", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the wait
        try:  # a read neither waits for a writer nor blocks one (WAL, deferred)
            assert client.get(f"{API}/jobs").status_code == 200
        finally:
            holder.execute("ROLLBACK")
        # A process that keeps the file to itself (exclusive locking mode) locks readers out.
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE projector_positions SET position = position")
        try:
            response = client.get(f"{API}/jobs")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert "locked" not in response.text  # no SQLite detail reaches the client
