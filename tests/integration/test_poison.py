"""An event a consumer cannot apply (DESIGN §2.8): refused at the api, and if one is in the
store anyway (an older api wrote it), the projector says so on /health and /metrics and
the api keeps serving what it can."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.runtime import build_api
from shared.settings import Settings
from tests.processes import wait_until
from tests.readwrites import API, submit

pytestmark = pytest.mark.postgres


def test_an_event_the_read_tables_cannot_hold_is_named_on_health_and_metrics(
    postgres_settings: Settings,
) -> None:
    settings = postgres_settings.model_copy(update={"read_wait_seconds": 0.5})
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        earlier = submit(client)["id"]
        for field in ("job_name", "description"):  # the api refuses what a table cannot hold
            body = {"job_name": "ok", field: "a\u0000b"}
            refused = client.post(f"{API}/jobs", json=body)
            assert refused.status_code == 422 and field in refused.text, refused.text
        # What an older api let in: PostgreSQL text cannot hold NUL.
        position = context.jobs.submit("a\x00b", "", {"epochs": 1}, "old-api").position

        def stuck() -> str | None:
            projection: str = client.get("/health").json()["projection"]
            return projection if projection != "ok" else None

        said = wait_until(stuck, 30, "/health to name the stuck position")
        assert f"position {position}" in said and "NUL" in said, said
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        metrics = client.get("/metrics").text
        assert f'heimdall_projector_stuck_position{{stage="projecting"}} {position}.0' in metrics
        listed = client.get(f"{API}/jobs").json()["jobs"]  # reads still served
        assert [j["id"] for j in listed] == [earlier]
        late = client.post(f"{API}/jobs", json={"job_name": "after"})
        assert late.status_code == 503 and late.json()["stored"] is True  # no silent 201
