"""Work by kind on the embedded run: a job waits, visibly, for a trainer that can run it;
the sweep gives a runnable job whose work message was lost a new one; a message for a job
that is not runnable any more is dropped without a write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.deps import ApiContext
from services.projector.runner import Projector
from services.runtime import build_api
from services.trainer.worker import Trainer
from shared.bus import Envelope, WorkDepth
from shared.settings import Settings
from tests.unit.trainer.configs import tiny_config

API = "/api/v1/training"


@dataclass
class Embedded:
    client: TestClient
    context: ApiContext
    trainer: Trainer

    def submit(self, **config: Any) -> str:
        body = {"job_name": "routed", "config": tiny_config(**config).model_dump(mode="json")}
        response = self.client.post(f"{API}/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"{API}/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()["job"]
        return body

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def kinds(self, job_id: str) -> list[str]:
        return [e["kind"] for e in self.client.get(f"{API}/jobs/{job_id}/events").json()["events"]]


def until(condition: Callable[[], bool], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def cpu_only(sqlite_settings: Settings) -> Iterator[Embedded]:
    """The embedded run with one trainer that takes CPU work only, as on a host with no GPU."""
    settings = sqlite_settings.model_copy(update={"trainer_kind": "cpu", "sweep_seconds": 0.2})
    context, background = build_api(settings, with_projector=True)
    trainer = Trainer(settings, context.jobs, context.reads, context.bus)
    background.append(trainer.run_forever)
    with TestClient(create_app(context, background)) as client:
        yield Embedded(client, context, trainer)


def test_a_gpu_job_waits_for_a_gpu_trainer_and_says_why_while_cpu_work_runs(
    cpu_only: Embedded,
) -> None:
    gpu = cpu_only.submit(accelerator="gpu", epochs=1)
    auto = cpu_only.submit(accelerator="auto", epochs=1)
    until(lambda: cpu_only.job(auto)["status"] == "completed")
    until(lambda: cpu_only.job(gpu)["waiting"] is not None, 10)
    job = cpu_only.job(gpu)
    assert (job["status"], job["attempt"], job["error_message"]) == ("queued", 0, None)
    assert "GPU" in job["waiting"] and "no free trainer" in job["waiting"], job["waiting"]
    assert cpu_only.kinds(gpu) == ["Submitted"]  # never claimed, never failed
    assert cpu_only.job(auto)["waiting"] is None
    until(  # the api reads the queues every 2 s: wait for the read after the publish
        lambda: 'heimdall_work_queue_ready{queue="gpu"} 1.0' in cpu_only.metrics(), 10
    )
    metrics = cpu_only.metrics()
    assert 'heimdall_work_queue_consumers{queue="gpu"} 0.0' in metrics
    assert 'heimdall_work_queue_consumers{queue="cpu"} 1.0' in metrics


async def test_the_sweep_republishes_a_lost_work_message_and_only_then(
    sqlite_settings: Settings,
) -> None:
    settings = sqlite_settings.model_copy(update={"trainer_kind": "cpu"})
    context, _ = build_api(settings, with_projector=False)
    projector = Projector(context.jobs, context.reads, context.bus, sweep_seconds=0.05)
    context.jobs.submit("lost", "", tiny_config().model_dump(mode="json"), "tester")
    await projector.project_pending()  # the row, but its work message never sent
    assert await projector.sweep() == 0  # not waited a sweep period yet: not counted
    await asyncio.sleep(0.1)
    assert await projector.sweep() == 1
    assert await projector.sweep() == 0  # its message waits in the queue now
    assert (await context.bus.work_depths())["cpu"] == WorkDepth(1, 0)


async def test_a_message_for_a_job_that_is_not_runnable_is_dropped_without_a_write(
    sqlite_settings: Settings,
) -> None:
    settings = sqlite_settings.model_copy(update={"trainer_kind": "cpu"})
    context, _ = build_api(settings, with_projector=False)
    trainer = Trainer(settings, context.jobs, context.reads, context.bus)
    job = context.jobs.submit("x", "", tiny_config().model_dump(mode="json"), "tester").job
    context.jobs.cancel(job.id, "tester")
    before = len(context.jobs.history(job.id))
    assert await trainer.on_work(Envelope.work(str(job.id), "cpu")) is None
    assert len(context.jobs.history(job.id)) == before


async def test_after_a_restart_the_first_sweep_brings_back_every_runnable_job(
    sqlite_settings: Settings,
) -> None:
    """An in-process bus starts empty: a job queued before the restart (here: projected
    and published to a bus that is gone) gets its message at once, not a period later."""
    context, _ = build_api(sqlite_settings, with_projector=False)
    context.jobs.submit("before", "", tiny_config().model_dump(mode="json"), "tester")
    await Projector(context.jobs, context.reads, context.bus).catch_up()
    restarted, _ = build_api(sqlite_settings, with_projector=False)  # a fresh, empty bus
    projector = Projector(restarted.jobs, restarted.reads, restarted.bus, sweep_seconds=3600)
    stop = asyncio.Event()
    following = asyncio.create_task(projector.run_forever(stop))
    try:
        deadline = time.monotonic() + 10
        while (await restarted.bus.work_depths())["cpu"].ready != 1:
            assert time.monotonic() < deadline, "the runnable job never got a work message"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await following
