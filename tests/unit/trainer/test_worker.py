"""The trainer service on the embedded store: what it claims, what it leaves, what it
records when a job cannot run, when the store fails, and when it is told to stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from services.projector.runner import Projector
from services.trainer.worker import Trainer
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.bus import InProcessBus
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from tests.unit.trainer.configs import tiny_config


class Stack:
    """A store, its read tables kept current, and one trainer."""

    def __init__(self, settings: Settings, worker: str = "trainer-1") -> None:
        self.settings = settings.model_copy(update={"worker_name": worker})
        self.jobs: TrainingJobs = build_app(self.settings)
        self.reads: ReadStore = build_read_store(self.settings)
        self.bus = InProcessBus()
        self.trainer = Trainer(self.settings, self.jobs, self.reads, self.bus)

    def submit(self, **config: Any) -> UUID:
        """A job straight into the store, as an older api (or a changed trainer) left it."""
        fields = tiny_config().model_dump(mode="json") | config
        return self.jobs.submit("w", "", fields, "tester").job.id

    async def project(self) -> None:
        """The read tables, current; no work message sent (`run_next` finds the job)."""
        await Projector(self.jobs, self.reads, InProcessBus()).project_pending()

    async def deliver(self) -> None:
        """Project and publish what is new: work messages reach this stack's trainer."""
        await Projector(self.jobs, self.reads, self.bus).catch_up()

    def kinds(self, job_id: UUID) -> list[str]:
        return [e.kind for e in self.jobs.history(job_id)]


@pytest.fixture
def stack(sqlite_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    yield Stack(sqlite_settings.model_copy(update={"artifacts_dir": tmp_path / "artifacts"}))


async def test_a_job_that_cannot_run_here_fails_alone_and_the_next_one_runs(stack: Stack) -> None:
    poisoned = stack.submit(pretrained=True, pretrained_path="/nowhere/weights.pt")
    healthy = stack.submit(epochs=1)
    await stack.project()
    assert await stack.trainer.run_next()
    assert stack.kinds(poisoned)[-1] == "Failed"
    assert "pretrained_path" in (stack.jobs.get_job(poisoned).error_message or "")
    assert stack.kinds(healthy)[-1] == "Completed"


async def test_a_gpu_job_waits_for_a_gpu_trainer(stack: Stack) -> None:
    gpu_job = stack.submit(accelerator="gpu")
    await stack.project()
    assert not await stack.trainer.run_next()
    assert stack.kinds(gpu_job) == ["Submitted"]
    assert stack.jobs.get_job(gpu_job).status == "queued"


async def test_a_store_error_while_claiming_is_retried_not_the_jobs_failure(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = stack.submit(epochs=1)
    await stack.project()
    saves = {"n": 0}
    save = stack.jobs.save

    def flaky_save(*objs: Any, **kwargs: Any) -> Any:
        saves["n"] += 1
        if saves["n"] == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return save(*objs, **kwargs)

    monkeypatch.setattr(stack.jobs, "save", flaky_save)
    with pytest.raises(psycopg.OperationalError):
        await stack.trainer.run_next()
    assert stack.kinds(job_id) == ["Submitted"]  # not Failed
    assert await stack.trainer.run_next()
    assert stack.kinds(job_id)[-1] == "Completed"


async def test_every_epoch_is_stored_with_its_checkpoint_or_not_at_all(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.trainer import checkpoints
    from services.trainer import job as run

    job_id = stack.submit(epochs=2)
    await stack.project()
    real_save = checkpoints.save_checkpoint

    def disk_full_on_the_second(directory: Path, parts: Any, progress: Any, config: Any) -> Any:
        if progress.epoch == 2:
            raise OSError(28, "No space left on device")
        return real_save(directory, parts, progress, config)

    monkeypatch.setattr(run, "save_checkpoint", disk_full_on_the_second)
    assert await stack.trainer.run_next()
    events = stack.jobs.history(job_id)
    epochs = [e.data["epoch"] for e in events if e.kind == "EpochCompleted"]
    saved = [e.data["epoch"] for e in events if e.kind == "CheckpointSaved"]
    assert epochs == saved == [1], [e.kind for e in events]
    assert events[-1].kind == "Failed"


async def test_a_stopped_trainer_hands_its_job_back_and_another_resumes_it(
    stack: Stack, sqlite_settings: Settings
) -> None:
    job_id = stack.submit(epochs=3, dataset={"samples": 256, "n_mels": 16, "frames": 16})
    stop = asyncio.Event()
    running = asyncio.create_task(stack.trainer.run_forever(stop))
    await stack.deliver()
    deadline = time.monotonic() + 120
    while (hooks := stack.trainer.current) is None or hooks.last_step is None:
        assert time.monotonic() < deadline and not running.done()
        await asyncio.sleep(0.01)
    stop.set()  # what SIGTERM does
    await asyncio.wait_for(running, 60)
    preempted = stack.jobs.history(job_id)[-1]
    assert preempted.kind == "Preempted" and preempted.status == "queued", preempted
    assert preempted.data["checkpoint_uri"] and preempted.data["step"] >= 0
    await stack.project()
    other = Stack(stack.settings, worker="trainer-2")
    assert await other.trainer.run_next()
    job = stack.jobs.get_job(job_id)
    assert (job.status, job.attempt, job.workers_lost) == ("completed", 2, 0)
    kinds = stack.kinds(job_id)
    assert kinds.count("Resumed") == 1 and "WorkerLost" not in kinds
