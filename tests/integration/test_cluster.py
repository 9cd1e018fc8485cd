"""The services as separate processes on PostgreSQL and RabbitMQ (DESIGN §1, issue 3)."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.projector.replay import replay
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings
from tests.processes import (
    API,
    Service,
    assert_live_progress,
    free_port,
    settings_env,
    tiny_config,
    wait_healthy,
    wait_job,
    wait_status,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]
FINISHED = ("completed", "failed", "cancelled")
# Long enough epochs to act mid-epoch on two shared cores: ~60 steps each.
SLOW = {"batch_size": 8, "dataset": {"samples": 600, "n_mels": 16, "frames": 16}}


class Cluster:
    """api, projector and trainers as their own processes, sharing one store and broker."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings, self.log_dir = settings, log_dir
        self.port = free_port()
        self.services: dict[str, Service] = {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15)

    def start(self, name: str, command: str, **env: Any) -> Service:
        environment = settings_env(self.settings, api_port=self.port, **env)
        service = Service(command, environment, self.log_dir, name).start()
        self.services[name] = service
        return service

    def trainer(self, name: str) -> Service:
        return self.start(name, "trainer", worker_name=name)

    def submit(self, **config: Any) -> str:
        body = {"job_name": f"it-{uuid.uuid4().hex[:6]}", "config": tiny_config(**config)}
        response = self.client.post(f"{API}/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    def events(self, job_id: str) -> list[dict[str, Any]]:
        page: list[dict[str, Any]] = self.client.get(f"{API}/jobs/{job_id}/events").json()["events"]
        return page

    def metrics_epochs(self, job_id: str) -> list[int]:
        return [m["epoch"] for m in self.client.get(f"{API}/jobs/{job_id}/metrics").json()]

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        self.client.close()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{s.log()[-4000:]}" for n, s in self.services.items())


@pytest.fixture
def cluster(broker_settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    settings = broker_settings.model_copy(
        update={
            "lease_seconds": 3.0,
            "artifacts_dir": tmp_path / "artifacts",
        }
    )
    with running_cluster(settings, tmp_path) as running:
        yield running


@contextmanager
def running_cluster(settings: Settings, log_dir: Path) -> Iterator[Cluster]:
    """An api and a projector up (trainers are the test's to start); every service's
    log printed when the test fails, every process stopped after it."""
    running = Cluster(settings, log_dir)
    running.start("api", "api")
    running.start("projector", "projector")
    try:
        wait_healthy(running.client)
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.stop()


def test_a_running_jobs_row_carries_its_live_progress(cluster: Cluster) -> None:
    """Telemetry crosses RabbitMQ from the trainer process to the api's row."""
    cluster.trainer("t1")
    assert_live_progress(cluster.client)
    assert_replay_equals_live(cluster.settings)  # the live-only part is no part of replay
    api = cluster.services["api"].process
    assert api is not None  # it checked the models it was sent, without loading torch:
    assert "libtorch" not in Path(f"/proc/{api.pid}/maps").read_text()
    status = Path(f"/proc/{api.pid}/status").read_text()
    rss_mb = next(int(line.split()[1]) for line in status.splitlines() if "VmRSS" in line) / 1024
    assert rss_mb < 300, rss_mb


def assert_replay_equals_live(settings: Settings) -> None:
    app, reads = build_app(settings), build_read_store(settings)
    try:
        wait_until(
            lambda: reads.positions()["published"] == app.recorder.max_notification_id(),
            30,
            "the projector to publish everything",
        )
        report = replay(app, reads, settings)
        assert report.equal, report.differences
    finally:
        reads.close()


def claims(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] in ("Started", "Resumed")]


def epochs_by_attempt(events: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Each attempt's recorded epochs, counted in the store itself (the metrics table's
    primary key would hide a duplicate)."""
    attempt, recorded = 0, dict[int, list[int]]()
    for event in events:
        if event["kind"] in ("Started", "Resumed"):
            attempt = event["data"]["attempt"]
        elif event["kind"] == "EpochCompleted":
            recorded.setdefault(attempt, []).append(event["data"]["epoch"])
    return recorded


def assert_each_epoch_once_per_attempt(events: list[dict[str, Any]], epochs: int) -> None:
    """No attempt records an epoch twice; an epoch recorded again is a later attempt's
    re-run after a resume from an older checkpoint; together they cover every epoch."""
    recorded = epochs_by_attempt(events)
    for attempt, done in recorded.items():
        assert len(done) == len(set(done)), (attempt, done)
    assert set().union(*map(set, recorded.values())) == set(range(1, epochs + 1)), recorded


def assert_superseded_attempts_wrote_nothing_after(
    events: list[dict[str, Any]], artifacts: Path
) -> None:
    """What each trainer did, not what the aggregate accepted: no checkpoint file of an
    attempt was written after the next attempt's claim (each attempt writes its own
    folder), so no attempt trained on once another had the job."""
    starts = {e["data"]["attempt"]: e["timestamp"] for e in claims(events)}
    job_dir = artifacts / events[0]["job_id"] / "checkpoints"
    for attempt in sorted(starts)[:-1]:
        successor = datetime.fromisoformat(starts[attempt + 1]).timestamp()
        folder = job_dir / f"attempt-{attempt}"
        late = [p.name for p in folder.glob("*.pt") if p.stat().st_mtime > successor]
        assert not late, (attempt, late)


def test_a_job_runs_end_to_end_across_processes(cluster: Cluster) -> None:
    cluster.trainer("trainer-a")
    job_id = cluster.submit()
    done = wait_status(cluster.client, job_id, FINISHED, timeout=180)
    assert done["status"] == "completed", cluster.logs()
    assert cluster.metrics_epochs(job_id) == [1, 2, 3]
    kinds = [e["kind"] for e in cluster.events(job_id)]
    assert kinds[:2] == ["Submitted", "Started"] and kinds[-1] == "Completed"
    assert_replay_equals_live(cluster.settings)


def test_pause_resume_and_cancel_act_mid_epoch(cluster: Cluster) -> None:
    cluster.trainer("trainer-a")
    job_id = cluster.submit(epochs=2, **SLOW)
    wait_status(cluster.client, job_id, ("running",), timeout=120)
    assert cluster.client.post(f"{API}/jobs/{job_id}/pause").status_code == 202
    paused = wait_status(cluster.client, job_id, ("paused",), timeout=60)
    pause_event = [e for e in cluster.events(job_id) if e["kind"] == "Paused"][-1]
    assert "-step-" in pause_event["data"]["checkpoint_uri"], pause_event  # mid-epoch
    assert paused["current_epoch"] == pause_event["data"]["epoch"]
    assert cluster.client.post(f"{API}/jobs/{job_id}/resume").status_code == 202
    done = wait_status(cluster.client, job_id, FINISHED, timeout=180)
    assert done["status"] == "completed", cluster.logs()
    assert cluster.metrics_epochs(job_id) == [1, 2]
    assert "Resumed" in [e["kind"] for e in cluster.events(job_id)]

    other = cluster.submit(epochs=2, **SLOW)
    wait_status(cluster.client, other, ("running",), timeout=120)
    assert cluster.client.post(f"{API}/jobs/{other}/cancel").status_code == 202
    cancelled = wait_status(cluster.client, other, FINISHED, timeout=60)
    assert cancelled["status"] == "cancelled"
    assert cancelled["current_epoch"] < 2
    assert_replay_equals_live(cluster.settings)


def test_killed_trainer_is_replaced_and_every_epoch_appears_once(cluster: Cluster) -> None:
    cluster.trainer("trainer-a")
    job_id = cluster.submit(epochs=5, **SLOW)
    running = wait_job(
        cluster.client, job_id, lambda j: j["checkpoint_path"], 180, "a first checkpoint"
    )
    assert running["status"] == "running"
    cluster.services["trainer-a"].kill()
    cluster.trainer("trainer-b")
    done = wait_status(cluster.client, job_id, FINISHED, timeout=300)
    assert done["status"] == "completed", cluster.logs()
    events = cluster.events(job_id)
    lost = [e for e in events if e["kind"] == "WorkerLost"]
    assert len(lost) == 1 and lost[0]["data"]["worker"] == "trainer-a"
    restart = claims(events)[-1]
    assert restart["actor"] == "trainer-b", events
    assert restart["data"]["resumed_from_epoch"] >= 1, [
        (e["kind"], e["actor"], e["data"].get("epoch"), e["data"].get("resumed_from_epoch"))
        for e in events
    ]
    assert cluster.metrics_epochs(job_id) == [1, 2, 3, 4, 5]
    assert_each_epoch_once_per_attempt(events, 5)
    assert_superseded_attempts_wrote_nothing_after(events, cluster.settings.artifacts)
    assert_replay_equals_live(cluster.settings)


def test_two_trainers_never_run_one_job_at_once(cluster: Cluster) -> None:
    cluster.trainer("trainer-a")
    cluster.trainer("trainer-b")
    jobs = [cluster.submit(epochs=2) for _ in range(4)]
    for job_id in jobs:
        assert wait_status(cluster.client, job_id, FINISHED, timeout=300)["status"] == "completed"
    runners = set()
    for job_id in jobs:
        events = cluster.events(job_id)
        assert len(claims(events)) == 1, events
        assert_each_epoch_once_per_attempt(events, 2)
        runners.add(claims(events)[0]["actor"])
    assert runners == {"trainer-a", "trainer-b"}


def test_rabbitmq_restart_mid_run_loses_no_event(cluster: Cluster) -> None:
    cluster.trainer("trainer-a")
    job_id = cluster.submit(epochs=4, **SLOW)
    wait_status(cluster.client, job_id, ("running",), timeout=120)
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    try:
        assert cluster.client.get(f"{API}/jobs/{job_id}").status_code == 200
        during = cluster.submit(epochs=1)  # a command still lands: it is in the store
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    done = wait_status(cluster.client, job_id, FINISHED, timeout=300)
    assert done["status"] == "completed", cluster.logs()
    assert cluster.metrics_epochs(job_id) == [1, 2, 3, 4]
    assert wait_status(cluster.client, during, FINISHED, timeout=180)["status"] == "completed"
    assert_replay_equals_live(cluster.settings)


def test_a_sigterm_hands_the_job_back_and_another_trainer_finishes_it(cluster: Cluster) -> None:
    first = cluster.trainer("t1")
    job_id = cluster.submit(epochs=3, **SLOW)
    wait_status(cluster.client, job_id, ("running",), timeout=120)
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)  # a deploy
    assert first.process.wait(60) == 0, first.log()[-3000:]
    handed_back = cluster.events(job_id)[-1]
    assert (handed_back["kind"], handed_back["status"]) == ("Preempted", "queued")
    cluster.trainer("t2")
    done = wait_status(cluster.client, job_id, FINISHED, timeout=300)
    assert done["status"] == "completed", cluster.logs()
    kinds = [e["kind"] for e in cluster.events(job_id)]
    assert "WorkerLost" not in kinds and kinds.count("Resumed") == 1
    resumed = next(e for e in cluster.events(job_id) if e["kind"] == "Resumed")
    assert (resumed["data"]["worker"], resumed["data"]["checkpoint_uri"]) == (
        "t2",
        handed_back["data"]["checkpoint_uri"],
    )


def test_a_job_starts_and_ends_while_the_projector_is_down(cluster: Cluster) -> None:
    """The trainer works from the work message, not from the read tables: once the
    projector has published it, the job runs with the projector gone."""
    job_id = cluster.submit(epochs=1)
    app, reads = build_app(cluster.settings), build_read_store(cluster.settings)
    try:
        wait_until(
            lambda: reads.positions()["published"] == app.recorder.max_notification_id(),
            30,
            "the projector to publish the submit",
        )
        cluster.services["projector"].kill()  # kill -9: it is down, and stays down
        cluster.trainer("t1")
        wait_until(
            lambda: app.get_job(uuid.UUID(job_id)).status == "completed",
            180,
            "the job to complete in the store",
        )
        row = reads.get_job(job_id)
        assert row is not None and row["status"] == "queued"  # nobody projected meanwhile
        kinds = [e.kind for e in app.history(uuid.UUID(job_id))]
        assert kinds[:2] == ["Submitted", "Started"] and kinds[-1] == "Completed", kinds
    finally:
        reads.close()
    cluster.start("projector", "projector")
    assert wait_status(cluster.client, job_id, FINISHED, timeout=60)["status"] == "completed"
    assert_replay_equals_live(cluster.settings)
