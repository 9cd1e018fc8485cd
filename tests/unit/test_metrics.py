"""`/metrics` in Prometheus format: requests by route template, jobs by status, lag."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app
from services.api.deps import ApiContext
from services.runtime import build_api
from shared.settings import Settings

API = "/api/v1/training"
JOB_ROUTE = f"{API}/jobs/{{job_id}}"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def submit(client: TestClient) -> str:
    response = client.post(f"{API}/jobs", json={"job_name": "m", "config": {"epochs": 1}})
    assert response.status_code == 201
    return str(response.json()["id"])


@pytest.fixture
def api(sqlite_settings: Settings) -> Iterator[tuple[TestClient, ApiContext]]:
    context, _ = build_api(sqlite_settings, with_projector=False)
    with TestClient(create_app(context)) as client:
        yield client, context


def test_requests_are_counted_by_route_template_and_status(
    api: tuple[TestClient, ApiContext],
) -> None:
    client, _ = api
    before = scrape(client)
    job_ids = [str(uuid.uuid4()) for _ in range(3)]
    for job_id in job_ids:
        assert client.get(f"{API}/jobs/{job_id}").status_code == 404
    client.get(f"/no/such/{uuid.uuid4()}")
    after = scrape(client)
    labels = {"method": "GET", "route": JOB_ROUTE, "status": "404"}
    grown = value(after, "heimdall_http_requests_total", **labels) - value(
        before, "heimdall_http_requests_total", **labels
    )
    assert grown == 3
    count = "heimdall_http_request_duration_seconds_count"
    assert value(after, count, method="GET", route=JOB_ROUTE) >= 3
    assert (
        value(
            after, "heimdall_http_requests_total", method="GET", route="<unmatched>", status="404"
        )
        >= 1
    )
    text = client.get("/metrics").text
    assert not any(job_id in text for job_id in job_ids), "a raw path became a label"


def test_jobs_by_status_and_projector_lag_are_read_at_scrape_time(
    api: tuple[TestClient, ApiContext],
) -> None:
    client, context = api
    for _ in range(2):  # straight to the store: an api command would wait for a projector
        context.jobs.submit("lagging", "", {"epochs": 1}, "tester")
    samples = scrape(client)
    assert value(samples, "heimdall_store_position") == 2
    assert value(samples, "heimdall_projector_position", stage="projected") == 0
    assert value(samples, "heimdall_projector_lag_events") == 2
    assert value(samples, "heimdall_jobs", status="queued") == 0
    assert value(samples, "heimdall_store_up") == 1

    from services.projector.projection import JobsProjection

    projection = JobsProjection(context.jobs, context.reads)
    for notification in context.jobs.recorder.select_notifications(1, 10):
        projection.process(notification)
    samples = scrape(client)
    assert value(samples, "heimdall_projector_lag_events") == 0
    assert value(samples, "heimdall_jobs", status="queued") == 2
    assert value(samples, "heimdall_jobs", status="running") == 0


def test_the_embedded_projector_counts_what_it_projects(sqlite_settings: Settings) -> None:
    context, background = build_api(sqlite_settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        before = value(scrape(client), "heimdall_events_projected_total")
        submit(client)
        deadline = time.monotonic() + 10
        while value(scrape(client), "heimdall_projector_lag_events") > 0:
            assert time.monotonic() < deadline, "the projector never caught up"
            time.sleep(0.05)
        assert value(scrape(client), "heimdall_events_projected_total") >= before + 1


def test_gpu_memory_is_reported_once_cuda_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: torch.cuda's answers are stood in for; the GPU machine shows the real ones."""
    import torch

    from shared.metrics import GpuCollector

    if not torch.cuda.is_available():
        assert list(GpuCollector().collect()) == []
    fake = {"memory_allocated": 1024, "memory_reserved": 4096, "max_memory_allocated": 2048}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, amount in fake.items():
        monkeypatch.setattr(torch.cuda, name, lambda index, amount=amount: amount)
    (family,) = GpuCollector().collect()
    assert {(s.labels["device"], s.labels["kind"], s.value) for s in family.samples} == {
        ("cuda:0", "allocated", 1024),
        ("cuda:0", "reserved", 4096),
        ("cuda:0", "peak", 2048),
    }
