"""Invariants 3-5 and 8 on each backend: stored, projected once, replayable, never illegal."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import IntegrityError
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.projector.projection import JobsProjection
from services.projector.replay import replay
from services.projector.runner import Projector
from services.runtime import build_api
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.bus import InProcessBus
from shared.domainmodel import TrainingJob, TrainingJobError
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from shared.views import job_row

API = "/api/v1/training"
Store = tuple[TrainingJobs, ReadStore]
RESULT: dict[str, Any] = {"final_metrics": {"val_loss": 0.4}, "best_epoch": 2, "best_val_loss": 0.4}
RESULT["model_uri"] = "m"


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    app, reads = build_app(settings), build_read_store(settings)
    yield app, reads
    reads.close()
    app.close()


def submit(app: TrainingJobs, epochs: int = 4, max_attempts: int = 3) -> UUID:
    config = {"epochs": epochs, "max_attempts": max_attempts, "model_architecture": "resnet18"}
    return app.submit(f"job-{uuid.uuid4().hex[:6]}", "", config, "alice").job.id


def epoch(worker: str, attempt: int, n: int, best: bool = False) -> Callable[[TrainingJob], None]:
    metrics = {"epoch": n, "train_loss": 1.0 / n, "val_loss": 1.2 / n, "learning_rate": 1e-3}
    return lambda job: job.complete_epoch(worker, attempt, metrics, best)


def mixed_workload(app: TrainingJobs) -> list[UUID]:
    """Every kind of event, on several jobs, interleaved."""
    done, paused, lost, failed, queued = (submit(app) for _ in range(5))
    gone = submit(app, max_attempts=1)
    for job_id in (done, paused, lost, failed, gone):
        app.change(job_id, lambda job: job.claim("t1", "cpu", 80, 20))
    app.change(done, epoch("t1", 1, 1, best=True))
    app.change(paused, epoch("t1", 1, 1))
    app.change(done, lambda job: job.save_checkpoint("t1", 1, 1, "/ck/1.pt", "aa"))
    app.pause(paused, "bob")
    app.change(paused, lambda job: job.record_paused("t1", 1, 1, "/ck/p1.pt"))
    app.resume(paused, "bob")
    app.change(paused, lambda job: job.claim("t2", "cpu", 80, 20))
    app.change(paused, epoch("t2", 2, 2, best=True))
    app.change(done, epoch("t1", 1, 2, best=True))
    app.change(done, lambda job: job.complete("t1", 1, **RESULT))
    app.change(lost, lambda job: job.lose_worker(1, "reaper"))
    app.change(gone, lambda job: job.lose_worker(1, "reaper"))
    app.change(failed, lambda job: job.fail("t1", 1, "nan loss", "FloatingPointError"))
    app.cancel(paused, "carol")
    app.change(paused, lambda job: job.record_cancelled("t2", 2, 2))
    app.pause(queued, "bob")
    for job_id in (done, failed, paused):
        app.archive(job_id, "dave")
    return [done, paused, lost, failed, queued, gone]


async def project(app: TrainingJobs, reads: ReadStore) -> int:
    """What the live projector does, to the end of the store."""
    return await Projector(app, reads, InProcessBus()).catch_up()


def last_position(app: TrainingJobs, job_id: UUID) -> int:
    return app.history(job_id)[-1].position


# Invariant 3: a 2xx command is in the store.


def test_every_2xx_command_is_in_the_store(settings: Settings) -> None:
    context, background = build_api(settings, with_projector=True)  # commands await it
    jobs = context.jobs
    with TestClient(create_app(context, background)) as client:
        submitted = client.post(f"{API}/jobs", json={"job_name": "a", "config": {"epochs": 2}})
        assert submitted.status_code == 201
        job_id = submitted.json()["id"]
        assert [e.kind for e in jobs.history(UUID(job_id))] == ["Submitted"]
        steps = [
            ("POST", f"/jobs/{job_id}/pause", "PauseRequested"),
            ("POST", f"/resume/{job_id}", "ResumeRequested"),
            ("POST", f"/pause/{job_id}", "PauseRequested"),
            ("POST", f"/jobs/{job_id}/resume", "ResumeRequested"),
            ("POST", f"/jobs/{job_id}/cancel", "CancelRequested"),
            ("DELETE", f"/jobs/{job_id}", "Archived"),
        ]
        for method, path, kind in steps:
            response = client.request(method, API + path)
            assert response.status_code in (202, 204), response.text
            history = jobs.history(UUID(job_id))
            assert history[-1].kind == kind
            if response.status_code == 202:
                assert response.json()["version"] == history[-1].version == len(history)
        again = client.post(f"{API}/jobs", json={"job_name": "b"}, headers={"Idempotency-Key": "k"})
        retry = client.post(f"{API}/jobs", json={"job_name": "b"}, headers={"Idempotency-Key": "k"})
        assert again.json()["id"] == retry.json()["id"]
    feed = jobs.feed(0, 1000)
    assert [e.kind for e in feed].count("Submitted") == 2
    assert len(feed) == 2 + len(steps)
    context.reads.close()
    jobs.close()


# Invariant 8: bad input changes nothing.


def test_illegal_transitions_append_nothing(store: Store) -> None:
    app, _ = store
    job_id = submit(app)
    app.cancel(job_id, "bob")
    before = app.recorder.max_notification_id()
    for command in (app.pause, app.resume):
        with pytest.raises(TrainingJobError):
            command(job_id, "mallory")
    with pytest.raises(TrainingJobError):
        app.change(job_id, lambda job: job.claim("t1", "cpu", 1, 1))
    app.cancel(job_id, "bob")  # idempotent: no second event
    assert app.recorder.max_notification_id() == before
    assert [e.kind for e in app.history(job_id)] == ["Submitted", "CancelRequested"]


# Invariant 4: a redelivered event changes nothing twice.


async def test_duplicate_delivery_changes_nothing(store: Store) -> None:
    app, reads = store
    job_id = submit(app)
    app.change(job_id, lambda job: job.claim("t1", "cpu", 80, 20))
    app.change(job_id, epoch("t1", 1, 1, best=True))
    app.change(job_id, epoch("t1", 1, 2))
    notifications = app.recorder.select_notifications(0, 100)
    projection = JobsProjection(app, reads)
    assert all(projection.process(n) for n in notifications)
    before = reads.snapshot()
    assert before[0] == notifications[-1].id and len(before[2]) == 2
    fresh_projection = JobsProjection(app, reads)  # a restarted projector, empty cache
    for redelivered in (notifications[-1], notifications[-1], notifications[1], notifications[0]):
        assert projection.process(redelivered) is False
        assert fresh_projection.process(redelivered) is False
    assert reads.snapshot() == before
    row = reads.get_job(str(job_id))
    assert row is not None and (row["current_epoch"], row["version"]) == (2, 4)


# Invariant 5: replaying the store gives the live tables.


async def test_replay_equals_live_and_sees_corruption(store: Store, settings: Settings) -> None:
    app, reads = store
    job_ids = mixed_workload(app)
    handled = await project(app, reads)
    assert handled == len(app.feed(0, 1000))
    report = replay(app, reads, settings)
    assert report.equal, report.differences
    assert (report.position, report.events) == (app.recorder.max_notification_id(), handled)
    assert (report.jobs, report.metrics) == (len(job_ids), 4)
    for job_id in job_ids:
        row = reads.get_job(str(job_id))
        assert row == job_row(app.get_job(job_id), last_position(app, job_id))
    victim = str(job_ids[0])
    with reads.transaction() as tx:
        tx.execute("UPDATE training_jobs SET status = 'running' WHERE id = ?", [victim])
        tx.execute("DELETE FROM training_metrics WHERE job_id = ? AND epoch = 2", [victim])
    broken = replay(app, reads, settings)
    assert not broken.equal
    assert len(broken.differences) == 2
    assert all(victim in line for line in broken.differences)
    assert any("running" in line for line in broken.differences)


# Invariants 2 and 6 under contention: concurrent commands leave a legal history.

THREADS = 20


def command_for(kind: str, actor: str) -> Callable[[TrainingJob], object]:
    if kind == "PauseRequested":
        return lambda job: job.request_pause(actor)
    if kind == "ResumeRequested":
        return lambda job: job.request_resume(actor)
    return lambda job: job.request_cancel(actor)


def concurrently(app: TrainingJobs, job_id: UUID, kinds: list[str]) -> list[str]:
    """One thread per command, released together; what each thread got."""
    gate, outcomes = threading.Barrier(len(kinds)), [""] * len(kinds)

    def run(i: int) -> None:
        changed: list[object] = []
        command = command_for(kinds[i], f"user-{i}")
        gate.wait()
        try:
            app.change(job_id, lambda job: changed.append(command(job)))
        except TrainingJobError:
            outcomes[i] = "refused"
            return
        outcomes[i] = "noop" if changed[-1] is False else kinds[i]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def count_conflicts(app: TrainingJobs, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many saves lost the optimistic-concurrency race (and were retried by `change`)."""
    conflicts, save = [0], app.save

    def counting(*args: Any, **kwargs: Any) -> Any:
        try:
            return save(*args, **kwargs)
        except IntegrityError:
            conflicts[0] += 1
            raise

    monkeypatch.setattr(app, "save", counting)
    return conflicts


async def test_concurrent_commands_leave_a_legal_history(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, reads = store
    job_id = submit(app)
    conflicts = count_conflicts(app, monkeypatch)
    toggles = ["PauseRequested", "ResumeRequested"] * (THREADS // 2)
    outcomes = concurrently(app, job_id, toggles)
    outcomes += concurrently(app, job_id, toggles[:-4] + ["CancelRequested"] * 4)
    assert "" not in outcomes, outcomes  # every thread ended with an answer
    assert conflicts[0] > 0  # the threads really raced for the same version
    history = app.history(job_id)
    assert [e.version for e in history] == list(range(1, len(history) + 1))
    recorded = sorted(e.kind for e in history[1:])
    assert recorded == sorted(o for o in outcomes if o not in ("refused", "noop"))
    assert "CancelRequested" in recorded and history[-1].kind == "CancelRequested"
    replayed: Any = None
    for stored in history:
        if replayed is not None:  # the same command on the state before must be legal
            trial = copy.deepcopy(replayed)
            command_for(stored.kind, stored.actor)(trial)
            (event,) = trial.collect_events()
            assert type(event).__name__ == stored.kind
        replayed = app.repository.get(job_id, version=stored.version)
    assert replayed.status == app.get_job(job_id).status == "cancelled"
    await project(app, reads)
    assert reads.get_job(str(job_id)) == job_row(replayed, history[-1].position)
    report = replay(app, reads, settings)
    assert report.equal, report.differences
