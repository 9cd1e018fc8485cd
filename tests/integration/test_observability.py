"""Metrics ports and JSON logs of separate projector and trainer processes; no SQL in errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app
from services.runtime import build_api
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings
from tests.conftest import POSTGRES_URL
from tests.processes import Service, free_port, settings_env, tiny_config, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Processes = dict[str, tuple[Service, int]]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def cluster_settings(broker_settings: Settings, tmp_path: Path) -> Settings:
    return broker_settings.model_copy(
        update={
            "artifacts_dir": tmp_path / "artifacts",
        }
    )


@pytest.fixture
def processes(
    cluster_settings: Settings, tmp_path: Path
) -> Iterator[dict[str, tuple[Service, int]]]:
    started: dict[str, tuple[Service, int]] = {}
    for name, command in [("projector", "projector"), ("trainer", "trainer")]:
        port = free_port()
        env = settings_env(
            cluster_settings, metrics_port=port, worker_name=f"{name}-{port}", log_format="json"
        )
        started[name] = Service(command, env, tmp_path, name).start(), port
    try:
        yield started
    finally:
        for service, _ in started.values():
            service.stop()


def test_projector_and_trainer_serve_their_metrics_and_log_json_with_the_job_id(
    cluster_settings: Settings, processes: Processes
) -> None:
    (projector, projector_port), (trainer, trainer_port) = processes.values()
    jobs, reads = build_app(cluster_settings), build_read_store(cluster_settings)
    job = jobs.submit("observed", "", tiny_config(epochs=2), "tester").job
    job_id, worker = str(job.id), f"trainer-{trainer_port}"

    def finished() -> bool:
        row = reads.get_job(job_id)
        return row is not None and row["status"] in ("completed", "failed")

    wait_until(finished, 180, "the job to finish")
    assert reads.get_job(job_id)["status"] == "completed"  # type: ignore[index]
    wait_until(
        lambda: scrape(projector_port)[("heimdall_projector_lag_events", ())] == 0, 30, "lag 0"
    )
    from_projector = scrape(projector_port)
    assert from_projector[("heimdall_events_projected_total", ())] >= 6
    assert from_projector[("heimdall_store_up", ())] == 1
    from_trainer = scrape(trainer_port)
    assert from_trainer[("heimdall_trainer_epochs_total", (("worker", worker),))] == 2
    assert from_trainer[("heimdall_trainer_samples_per_second", (("worker", worker),))] > 0
    assert from_trainer[("heimdall_trainer_busy", (("worker", worker),))] == 0
    reads.close()

    for service in (projector, trainer):
        service.stop()
    lines = [json.loads(line) for line in trainer.log().splitlines() if line.strip()]
    tagged = [line for line in lines if line.get("job_id") == job_id]
    assert sum("epoch" in line["message"] for line in tagged) == 2
    assert all(line.get("job_id") == job_id for line in lines if job_id in line["message"])
    for line in projector.log().splitlines():
        json.loads(line)


def test_a_postgres_error_never_reaches_the_client(postgres_settings: Settings) -> None:
    context, _ = build_api(postgres_settings, with_projector=False)
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{postgres_settings.database_schema}".training_jobs')
        response = client.get("/api/v1/training/jobs", params={"status": "running"})
    assert response.status_code == 500, response.text
    assert response.json() == {"detail": "internal server error"}
    for leak in ("training_jobs", "SELECT", "relation", "LINE 1", "Traceback", "psycopg"):
        assert leak not in response.text
