"""`heimdall up`: the whole system in one process on the embedded default, over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.readmodel.shapes import EpochMetrics
from shared.settings import Settings
from tests.processes import (
    API,
    HEIMDALL,
    Service,
    assert_live_progress,
    free_port,
    settings_env,
    tiny_config,
    wait_healthy,
    wait_status,
)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[httpx.Client]:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "var", poll_seconds=0.05)
    env = settings_env(settings, api_port=port, api_host="127.0.0.1")
    service = Service("up", env, tmp_path, "up").start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        try:
            wait_healthy(client)
            yield client
        finally:
            service.stop()
            print(service.log()[-3000:])


def test_embedded_run_trains_a_job_to_completion(embedded: httpx.Client) -> None:
    created = embedded.post(f"{API}/jobs", json={"job_name": "e2e", "config": tiny_config()})
    assert created.status_code == 201, created.text
    done = wait_status(embedded, created.json()["id"], ("completed", "failed"), timeout=180)
    assert done["status"] == "completed", done
    assert done["current_epoch"] == 3 and done["progress_percent"] == 100.0
    assert Path(done["model_path"]).is_file()
    metrics = embedded.get(f"{API}/jobs/{done['id']}/metrics").json()
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(m["val_distance_p50_m"] > 0 for m in metrics)
    kinds = [e["kind"] for e in embedded.get(f"{API}/jobs/{done['id']}/events").json()["events"]]
    assert kinds[0] == "Submitted" and kinds[1] == "Started" and kinds[-1] == "Completed"
    assert kinds.count("EpochCompleted") == 3


def test_a_running_jobs_row_carries_its_live_progress(embedded: httpx.Client) -> None:
    assert_live_progress(embedded)


def test_cli_talks_to_the_running_api(embedded: httpx.Client, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "epochs: 1\nbatch_size: 16\naccelerator: cpu\n"
        "dataset: {samples: 64, n_mels: 16, frames: 16}\n"
    )
    env = {**os.environ, "HEIMDALL_API_URL": str(embedded.base_url)}
    submitted = subprocess.run(
        [*HEIMDALL, "submit", str(config), "--name", "from-cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split()[1]
    assert wait_status(embedded, job_id, ("completed",), timeout=120)["job_name"] == "from-cli"
    listed = subprocess.run(
        [*HEIMDALL, "jobs"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "from-cli" in listed.stdout and "completed" in listed.stdout
    refused = subprocess.run(
        [*HEIMDALL, "pause", job_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "409" in refused.stdout
    audit = subprocess.run(
        [*HEIMDALL, "audit", job_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert audit.returncode == 0
    for kind in ("Submitted", "Started", "EpochCompleted", "Completed", "anonymous"):
        assert kind in audit.stdout, audit.stdout
    env_narrow = {**env, "COLUMNS": "80"}  # a plain terminal: a row per metric, whole
    metrics = subprocess.run(
        [*HEIMDALL, "metrics", job_id], env=env_narrow, capture_output=True, text=True, timeout=60
    )
    assert metrics.returncode == 0, metrics.stderr
    labels = {line.split("│")[1].strip() for line in metrics.stdout.splitlines() if "│" in line}
    for name in EpochMetrics.model_fields:  # the declared shape, every field
        assert name == "epoch" or name in labels, (name, metrics.stdout)


@pytest.mark.timeout(600)
def test_a_sigterm_checkpoints_the_running_job_and_a_restart_finishes_it(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "var", poll_seconds=0.05)
    env = settings_env(settings, api_port=port, api_host="127.0.0.1")
    slow = tiny_config(epochs=2, batch_size=8, dataset={"samples": 320, "n_mels": 16, "frames": 16})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        first = Service("up", env, tmp_path, "up-1").start()
        try:
            wait_healthy(client)
            job_id = client.post(f"{API}/jobs", json={"job_name": "deploy", "config": slow})
            job_id = job_id.json()["id"]
            wait_status(client, job_id, ("running",), timeout=120)
            assert first.process is not None
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(60) == 0, first.log()[-3000:]
        finally:
            first.kill()
        second = Service("up", env, tmp_path, "up-2").start()
        try:
            wait_healthy(client)
            done = wait_status(client, job_id, ("completed", "failed"), timeout=300)
            assert done["status"] == "completed", second.log()[-3000:]
            kinds = [e["kind"] for e in client.get(f"{API}/jobs/{job_id}/events").json()["events"]]
            assert "Preempted" in kinds and "WorkerLost" not in kinds
            assert kinds.index("Preempted") < kinds.index("Resumed")
        finally:
            second.stop()
