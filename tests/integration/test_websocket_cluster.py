"""Live streams with the services as separate processes on PostgreSQL and RabbitMQ: several
api replicas, an api restart, a slow client, and telemetry across the broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from websockets.asyncio.client import connect

from shared.bootstrap import build_app
from shared.settings import Settings
from tests.integration.test_cluster import Cluster
from tests.live import (
    Received,
    assert_matches_the_store,
    read_all,
    receive,
    tiny_window_socket,
    ws_base,
)
from tests.processes import (
    API,
    HEIMDALL,
    Service,
    free_port,
    settings_env,
    wait_healthy,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]
QUICK = {"epochs": 2, "dataset": {"samples": 64, "n_mels": 16, "frames": 16}}
SLOW_QUEUE = 8


@pytest.fixture
def cluster(broker_settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    """Store and broker names of its own; the test starts the services it needs."""
    settings = broker_settings.model_copy(
        update={
            "lease_seconds": 5.0,
            "artifacts_dir": tmp_path / "artifacts",
        }
    )
    running = Cluster(settings, tmp_path)
    try:
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.stop()


def start_api_and_projector(cluster: Cluster, **api_env: Any) -> None:
    cluster.start("api", "api", **api_env)
    cluster.start("projector", "projector")
    wait_healthy(cluster.client)


async def test_every_api_replica_delivers_live_events(cluster: Cluster, tmp_path: Path) -> None:
    start_api_and_projector(cluster)
    port = free_port()
    env = settings_env(cluster.settings, api_port=port)
    cluster.services["api2"] = Service("api", env, tmp_path, "api2").start()
    second = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)
    wait_healthy(second)
    urls = [f"{ws_base(c)}/ws/training" for c in (cluster.client, second)]
    async with connect(urls[0]) as one, connect(urls[1]) as two:
        for socket in (one, two):
            await receive(socket, Received(), until=lambda m: m["event"] == "connected")
        job_id = cluster.submit()
        assert second.post(f"{API}/jobs/{job_id}/cancel").status_code == 202
        got = [
            await receive(s, Received(), until=lambda m: m["event"] == "training_cancel_requested")
            for s in (one, two)
        ]
    second.close()
    for received in got:
        mine = [m for m in received.events() if m["job_id"] == job_id]
        assert [m["event"] for m in mine] == ["training_submitted", "training_cancel_requested"]
    assert got[0].positions() == got[1].positions()


async def test_a_slow_client_is_told_and_dropped_while_the_others_keep_up(
    cluster: Cluster,
) -> None:
    start_api_and_projector(cluster, ws_queue=SLOW_QUEUE)
    url = f"{ws_base(cluster.client)}/ws/training"
    sock = tiny_window_socket(cluster.port)
    async with connect(url) as fast, connect(url, sock=sock, max_queue=1, compression=None) as slow:
        await receive(slow, Received(), until=lambda m: m["event"] == "connected")
        # The slow client reads nothing more until the fast one has everything.
        jobs = await asyncio.to_thread(submit_big_jobs, cluster, 80)
        quick = await receive(fast, Received(), until=until_submitted(set(jobs)), seconds=60)
        assert submitted(quick, jobs) == jobs, "the fast client missed events"
        behind = await receive(slow, Received(), seconds=60)
    assert behind.close_code == 1013, (behind.close_code, behind.close_reason)
    error = behind.messages[-1]
    assert error["event"] == "error" and "too far behind" in error["detail"]
    last = behind.positions()[-1]
    assert f"?after={last}" in error["detail"]
    assert len(submitted(behind, jobs)) < len(jobs)
    missing = set(jobs) - set(submitted(behind, jobs))
    async with connect(f"{url}?after={last}") as again:
        rest = await receive(again, Received(), until=until_submitted(missing), seconds=60)
    assert submitted(behind, jobs) + submitted(rest, jobs) == jobs, "gap or repeat on resume"


def submit_big_jobs(cluster: Cluster, count: int) -> list[str]:
    """Jobs whose `training_submitted` messages are about 10 kB each."""
    body: dict[str, Any] = {"description": "x" * 10_000, "config": {"epochs": 1}}
    created = []
    for n in range(count):
        response = cluster.client.post(f"{API}/jobs", json={**body, "job_name": f"big-{n}"})
        assert response.status_code == 201, response.text
        created.append(response.json()["id"])
    return created


def submitted(received: Received, jobs: list[str]) -> list[str]:
    mine = set(jobs)
    return [m["job_id"] for m in received.of("training_submitted") if m["job_id"] in mine]


def until_submitted(expected: set[str]) -> Any:
    """True once a `training_submitted` of every expected job has arrived."""
    waiting = set(expected)

    def done(message: dict[str, Any]) -> bool:
        if message["event"] == "training_submitted":
            waiting.discard(message["job_id"])
        return not waiting

    return done


async def test_resume_after_an_api_restart_and_the_watching_cli_reconnects(
    cluster: Cluster, tmp_path: Path
) -> None:
    start_api_and_projector(cluster)
    job_id = cluster.submit(**QUICK)  # first: the api's first config check imports timm
    cluster.trainer("trainer-1")
    url = f"{ws_base(cluster.client)}/ws/training/{job_id}"
    watcher = watch_in_background(cluster, job_id, tmp_path)
    async with connect(f"{url}?after=0") as socket:
        before = await receive(socket, Received(), until=lambda m: m["event"] == "training_step")
        cluster.services["api"].kill()
    step = before.of("training_step")[0]  # telemetry crossed RabbitMQ
    assert step["job_id"] == job_id and "position" not in step
    last = before.positions()[-1]
    missed = await asyncio.to_thread(wait_for_events_after, cluster.settings, job_id, last)
    cluster.start("api", "api")
    await asyncio.to_thread(wait_healthy, cluster.client)
    after = await read_all(f"{url}?after={last}")
    assert after.close_code == 1000 and after.events()[-1]["event"] == "training_completed"
    assert set(missed) <= set(after.positions()), "events stored while the api was down"
    assert_matches_the_store(before.positions() + after.positions(), cluster.client, job_id)
    output, _ = await asyncio.to_thread(watcher.communicate, timeout=120)
    assert watcher.returncode == 0, output
    assert "reconnecting" in output and "completed; model:" in output


def watch_in_background(cluster: Cluster, job_id: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "HEIMDALL_API_URL": str(cluster.client.base_url), "COLUMNS": "200"}
    return subprocess.Popen(
        [*HEIMDALL, "watch", job_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


def wait_for_events_after(settings: Settings, job_id: str, position: int) -> list[int]:
    """Positions of the job's events stored after `position`, once there are some."""
    app = build_app(settings)
    found: list[int] = wait_until(
        lambda: [e.position for e in app.history(UUID(job_id), position)],
        60,
        "events while the api is down",
    )
    return found
