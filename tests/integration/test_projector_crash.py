"""Invariant 3 across a crash: `kill -9` the projector mid-stream, restart, nothing lost."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import pytest

from services.projector.replay import replay
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from shared.views import job_row

JOBS = 8
FIRST_EVENTS = 300
DEADLINE_SECONDS = 90.0


def projector_command() -> list[str]:
    """`heimdall projector`, through the installed entry point when there is one."""
    script = Path(sys.executable).parent / "heimdall"
    if script.exists():
        return [str(script), "projector"]
    return [sys.executable, "-c", "from heimdall_cli.main import app; app()", "projector"]


def projector_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIMDALL_")}
    env.update(
        HEIMDALL_DATA_DIR=str(settings.data_dir),
        HEIMDALL_DATABASE_SCHEMA=settings.database_schema,
        HEIMDALL_POLL_SECONDS=str(settings.poll_seconds),
    )
    if settings.database_url:
        env["HEIMDALL_DATABASE_URL"] = settings.database_url
    return env


@contextlib.contextmanager
def projector(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The projector as its own process; killed on the way out whatever happened."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            projector_command(), env=projector_env(settings), stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def wait_until(condition: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"timed out waiting for {what}; projector log:\n{tail}")
        time.sleep(0.02)


class Writer(threading.Thread):
    """Keeps appending what trainers append (epochs, checkpoints, new jobs) until halted."""

    def __init__(self, app: TrainingJobs, jobs: list[UUID]) -> None:
        super().__init__(daemon=True)
        self.app, self.jobs = app, jobs
        self.epochs = {job_id: 0 for job_id in jobs}
        self.halt = threading.Event()
        self.written = 0
        self.error: BaseException | None = None

    def step(self) -> None:
        job_id = self.jobs[self.written % len(self.jobs)]
        self.epochs[job_id] += 1
        n = self.epochs[job_id]
        metrics = {"epoch": n, "train_loss": 1.0 / n, "val_loss": 2.0 / n, "learning_rate": 1e-3}
        self.app.change(job_id, lambda job: job.complete_epoch("t1", 1, metrics, n % 3 == 0))
        if n % 10 == 0:
            uri = f"/ck/{job_id}/{n}.pt"
            self.app.change(job_id, lambda job: job.save_checkpoint("t1", 1, n, uri, "00"))
        self.written += 1

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.step()
                self.halt.wait(0.005)  # pace the writes: the projector must lag, not drown
        except BaseException as error:
            self.error = error


def end(app: TrainingJobs) -> int:
    """The last position in the store (0 while it is empty)."""
    return app.recorder.max_notification_id() or 0


def start_jobs(app: TrainingJobs) -> list[UUID]:
    config = {"epochs": 5000, "model_architecture": "resnet18"}
    jobs = []
    for i in range(JOBS):
        job_id = app.submit(f"crash-{i}-{uuid.uuid4().hex[:6]}", "", config, "alice").job.id
        app.change(job_id, lambda job: job.claim("t1", "cpu", 80, 20))
        jobs.append(job_id)
    return jobs


def assert_projection_is_the_store(app: TrainingJobs, reads: ReadStore, settings: Settings) -> None:
    report = replay(app, reads, settings)
    assert report.equal, report.differences[:5]
    assert report.position == end(app)
    all_events = app.feed(0, 1_000_000)
    assert report.events == len(all_events)
    epochs = {(e.job_id, e.data["epoch"]) for e in all_events if e.kind == "EpochCompleted"}
    assert report.metrics == len(epochs)
    job_ids = {e.job_id for e in all_events}
    assert report.jobs == len(job_ids)
    for job_id in job_ids:
        position = app.history(job_id)[-1].position
        assert reads.get_job(str(job_id)) == job_row(app.get_job(job_id), position)


def test_projection_survives_kill_9(settings: Settings, tmp_path: Path) -> None:
    app, reads = build_app(settings), build_read_store(settings)
    log = tmp_path / "projector.log"
    writer = Writer(app, start_jobs(app))
    try:
        while end(app) < FIRST_EVENTS:
            writer.step()
        writer.start()

        def projected() -> int:
            return reads.positions()["projected"]

        def mid_stream() -> bool:
            return 0 < projected() < end(app)

        with projector(settings, log) as first:
            wait_until(mid_stream, "the projector to start projecting", log)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        assert first.returncode == -signal.SIGKILL
        # A COMMIT sent just before the kill may still complete on the server: read the
        # position once writes have moved on, then check that nothing moves it.
        written_at_kill = writer.written
        wait_until(lambda: writer.written >= written_at_kill + 25, "writes while it is down", log)
        killed_at, written_at_kill = projected(), writer.written
        wait_until(lambda: writer.written >= written_at_kill + 25, "more writes", log)
        end_at_kill = end(app)
        assert 0 < killed_at < end_at_kill
        assert projected() == killed_at  # nobody projects while it is down

        with projector(settings, log) as second:
            wait_until(lambda: projected() > end_at_kill, "the restart to catch up", log)
            writer.halt.set()
            writer.join(30)
            assert writer.error is None, writer.error

            def caught_up() -> bool:
                positions, last = reads.positions(), end(app)
                return positions["projected"] == positions["published"] == last

            wait_until(caught_up, "projected == published == end of store", log)
            assert second.poll() is None, "the projector died on its own"
        assert_projection_is_the_store(app, reads, settings)
    finally:
        writer.halt.set()
        if writer.is_alive():
            writer.join(30)
        reads.close()
        app.close()
