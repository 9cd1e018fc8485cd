"""API keys and roles on the REST api: who may read, who may command, who is recorded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.runtime import build_api
from shared.settings import Settings

API = "/api/v1/training"
OPERATOR_KEY = "op-" + uuid.uuid4().hex
VIEWER_KEY = "view-" + uuid.uuid4().hex
KEYS = f"frontend:{OPERATOR_KEY}:operator,grafana:{VIEWER_KEY}:viewer"
JOB = {"job_name": "auth", "config": {"epochs": 2}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[TestClient]:
    settings = Settings.model_validate({**sqlite_settings.model_dump(), "api_keys": KEYS})
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as test_client:
        yield test_client


def submit(client: TestClient) -> dict[str, Any]:
    response = client.post(f"{API}/jobs", json=JOB, headers=bearer(OPERATOR_KEY))
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("not-a-key-of-ours-at-all"),
        bearer(OPERATOR_KEY[:-1]),
        {"Authorization": f"Basic {OPERATOR_KEY}"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "unknown", "prefix", "basic", "empty"],
)
def test_a_missing_or_unknown_key_is_401_with_www_authenticate(
    client: TestClient, headers: dict[str, str]
) -> None:
    for method, path in [
        ("GET", f"{API}/jobs"),
        ("GET", f"{API}/events"),
        ("GET", f"{API}/jobs/{uuid.uuid4()}"),
        ("POST", f"{API}/jobs/{uuid.uuid4()}/pause"),
    ]:
        response = client.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in response.json()["detail"]


def test_nothing_is_stored_for_a_refused_submit(client: TestClient) -> None:
    before = client.get(f"{API}/events", headers=bearer(VIEWER_KEY)).json()["last_position"]
    assert client.post(f"{API}/jobs", json=JOB).status_code == 401
    assert client.post(f"{API}/jobs", json=JOB, headers=bearer(VIEWER_KEY)).status_code == 403
    after = client.get(f"{API}/events", headers=bearer(VIEWER_KEY)).json()
    assert after["last_position"] == before and after["events"] == []


def test_a_viewer_reads_but_may_not_command(client: TestClient) -> None:
    job_id = submit(client)["id"]
    viewer = bearer(VIEWER_KEY)
    for path in ["/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/metrics", f"/jobs/{job_id}/events"]:
        assert client.get(API + path, headers=viewer).status_code == 200, path
    for method, path in [
        ("POST", "/jobs"),
        ("POST", f"/jobs/{job_id}/pause"),
        ("POST", f"/jobs/{job_id}/resume"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("POST", f"/pause/{job_id}"),
        ("DELETE", f"/jobs/{job_id}"),
    ]:
        response = client.request(method, API + path, headers=viewer, json=JOB)
        assert response.status_code == 403, (method, path, response.text)
        detail = response.json()["detail"]
        assert "grafana" in detail and "operator" in detail and "Traceback" not in detail
    events = client.get(f"{API}/jobs/{job_id}/events", headers=viewer).json()["events"]
    assert [e["kind"] for e in events] == ["Submitted"]


def test_the_operators_key_name_is_the_actor_in_the_events(client: TestClient) -> None:
    job_id = submit(client)["id"]
    operator = bearer(OPERATOR_KEY)
    assert client.post(f"{API}/jobs/{job_id}/pause", headers=operator).status_code == 202
    assert client.post(f"{API}/jobs/{job_id}/resume", headers=operator).status_code == 202
    assert client.delete(f"{API}/jobs/{job_id}", headers=operator).status_code == 202
    events = client.get(f"{API}/jobs/{job_id}/events", headers=operator).json()["events"]
    assert [(e["kind"], e["actor"]) for e in events] == [
        ("Submitted", "frontend"),
        ("PauseRequested", "frontend"),
        ("ResumeRequested", "frontend"),
        ("CancelRequested", "frontend"),
    ]


def test_open_routes_need_no_key(client: TestClient) -> None:
    for path in ["/health", "/metrics", "/openapi.json", "/docs", "/"]:
        assert client.get(path).status_code == 200, path


def test_without_keys_everyone_is_anonymous(sqlite_settings: Settings) -> None:
    context, background = build_api(sqlite_settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        job_id = client.post(f"{API}/jobs", json=JOB).json()["id"]
        events = client.get(f"{API}/jobs/{job_id}/events").json()["events"]
    assert [e["actor"] for e in events] == ["anonymous"]


def test_the_openapi_schema_documents_the_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    submit_op = schema["paths"][f"{API}/jobs"]["post"]
    assert {"HTTPBearer": []} in submit_op["security"]
    assert {"401", "403"} <= set(submit_op["responses"])
    assert "security" not in schema["paths"]["/health"]["get"]


def test_an_unauthenticated_body_is_not_even_read(client: TestClient) -> None:
    broken = client.post(
        f"{API}/jobs", content=b'{"job_name": ', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 401
    huge = client.post(f"{API}/jobs", content=b"x" * 2_000_000)
    assert huge.status_code == 401
