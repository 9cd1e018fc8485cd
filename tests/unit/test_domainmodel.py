"""The job state machine of DESIGN §3: every legal move, every illegal one refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest

from shared.domainmodel import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    FAILED,
    PAUSED,
    PAUSING,
    QUEUED,
    RUNNING,
    STATUSES,
    TERMINAL,
    ClaimLostError,
    IllegalTransitionError,
    TrainingJob,
    TrainingJobError,
)

W, USER = "trainer-1", "alice"
RESULT: dict[str, Any] = {
    "final_metrics": {"val_loss": 0.5},
    "best_epoch": 1,
    "best_val_loss": 0.5,
    "model_uri": "m",
}


def submitted(max_attempts: int = 3) -> TrainingJob:
    config = {"epochs": 4, "max_attempts": max_attempts, "model_architecture": "resnet18"}
    return TrainingJob(id=uuid4(), job_name="j", description="d", config=config, actor=USER)


def metrics(epoch: int, val_loss: float = 1.0) -> dict[str, Any]:
    return {"epoch": epoch, "train_loss": 1.5, "val_loss": val_loss, "learning_rate": 1e-3}


def running() -> TrainingJob:
    job = submitted()
    job.claim(W, "cpu", 100, 20)
    return job


def with_checkpoint() -> TrainingJob:
    job = running()
    job.complete_epoch(W, 1, metrics(1), is_best=True)
    job.save_checkpoint(W, 1, 1, "/ck/1.pt", "abc")
    return job


def pausing() -> TrainingJob:
    job = running()
    job.request_pause(USER)
    return job


def paused() -> TrainingJob:
    job = pausing()
    job.record_paused(W, 1, 0, "/ck/0.pt")
    return job


def cancelling() -> TrainingJob:
    job = running()
    job.request_cancel(USER)
    return job


def completed() -> TrainingJob:
    job = running()
    job.complete(W, 1, **RESULT)
    return job


def failed() -> TrainingJob:
    job = running()
    job.fail(W, 1, "boom", "RuntimeError")
    return job


def cancelled() -> TrainingJob:
    job = submitted()
    job.request_cancel(USER)
    return job


IN_STATUS: dict[str, Callable[[], TrainingJob]] = {
    QUEUED: submitted,
    RUNNING: running,
    PAUSING: pausing,
    PAUSED: paused,
    CANCELLING: cancelling,
    COMPLETED: completed,
    FAILED: failed,
    CANCELLED: cancelled,
}


def fresh(status: str) -> TrainingJob:
    """A job in `status` whose pending events were already collected (saved)."""
    job = IN_STATUS[status]()
    assert job.status == status
    job.collect_events()
    return job


def last_event(job: TrainingJob) -> TrainingJob.Event:
    events = job.collect_events()
    assert len(events) == 1, events
    event = events[0]
    assert isinstance(event, TrainingJob.Event)
    return event


def kind(event: object) -> str:
    return type(event).__name__


def test_every_status_has_a_builder() -> None:
    assert set(IN_STATUS) == set(STATUSES)


def test_submitted_is_queued_with_its_fields() -> None:
    job = submitted()
    (event,) = job.collect_events()
    assert (kind(event), job.status, job.version) == ("Submitted", QUEUED, 1)
    assert (job.job_name, job.description, job.submitted_by) == ("j", "d", USER)
    assert job.total_epochs == 4 and job.attempt == 0 and not job.archived
    assert job.created_on == event.timestamp


# (status before, command, event recorded, status after)
PEOPLE: list[tuple[str, str, str, str]] = [
    (QUEUED, "pause", "PauseRequested", PAUSED),
    (RUNNING, "pause", "PauseRequested", PAUSING),
    (PAUSED, "resume", "ResumeRequested", QUEUED),
    (QUEUED, "cancel", "CancelRequested", CANCELLED),
    (RUNNING, "cancel", "CancelRequested", CANCELLING),
    (PAUSING, "cancel", "CancelRequested", CANCELLING),
    (PAUSED, "cancel", "CancelRequested", CANCELLED),
    (COMPLETED, "archive", "Archived", COMPLETED),
    (FAILED, "archive", "Archived", FAILED),
    (CANCELLED, "archive", "Archived", CANCELLED),
]


def people_command(job: TrainingJob, command: str, actor: str = USER) -> None:
    if command == "pause":
        job.request_pause(actor)
    elif command == "resume":
        job.request_resume(actor)
    elif command == "cancel":
        job.request_cancel(actor)
    else:
        job.archive(actor)


@pytest.mark.parametrize(("before", "command", "event", "after"), PEOPLE)
def test_people_commands_record_their_event(
    before: str, command: str, event: str, after: str
) -> None:
    job = fresh(before)
    version = job.version
    people_command(job, command, actor="bob")
    recorded = last_event(job)
    assert (kind(recorded), job.status) == (event, after)
    assert recorded.actor == "bob"  # type: ignore[attr-defined]
    assert job.version == version + 1


ILLEGAL_PEOPLE = [
    (status, command)
    for command in ("pause", "resume", "cancel", "archive")
    for status in STATUSES
    if not any(b == status and c == command for b, c, _, _ in PEOPLE)
    and not (command == "cancel" and status in (CANCELLING, CANCELLED))
]


@pytest.mark.parametrize(("status", "command"), ILLEGAL_PEOPLE)
def test_illegal_people_commands_raise_and_record_nothing(status: str, command: str) -> None:
    job = fresh(status)
    version = job.version
    with pytest.raises(IllegalTransitionError) as raised:
        people_command(job, command)
    assert raised.value.status == status
    assert status in str(raised.value)
    assert job.collect_events() == []
    assert (job.status, job.version) == (status, version)


def test_illegal_list_covers_the_design() -> None:
    illegal = set(ILLEGAL_PEOPLE)
    assert {("pausing", "pause"), ("paused", "pause"), ("queued", "resume")} <= illegal
    assert {("completed", "cancel"), ("failed", "cancel"), ("running", "archive")} <= illegal
    assert ("cancelled", "cancel") not in illegal


@pytest.mark.parametrize("status", [CANCELLING, CANCELLED])
def test_cancel_is_idempotent_on_cancelling_and_cancelled(status: str) -> None:
    job = fresh(status)
    assert job.request_cancel(USER) is False
    assert job.collect_events() == []
    assert job.status == status


@pytest.mark.parametrize("status", [COMPLETED, FAILED])
def test_cancel_of_a_finished_job_is_a_conflict(status: str) -> None:
    job = fresh(status)
    with pytest.raises(TrainingJobError) as raised:
        job.request_cancel(USER)
    assert isinstance(raised.value, IllegalTransitionError)
    assert raised.value.status == status


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_archive_is_idempotent(status: str) -> None:
    job = fresh(status)
    assert job.archive(USER) is True
    assert job.archived
    assert kind(last_event(job)) == "Archived"
    assert job.archive(USER) is False
    assert job.collect_events() == []
    assert job.status == status


@pytest.mark.parametrize("status", [QUEUED, RUNNING, PAUSING, PAUSED, CANCELLING])
def test_archive_refused_until_terminal(status: str) -> None:
    job = fresh(status)
    with pytest.raises(IllegalTransitionError):
        job.archive(USER)
    assert not job.archived and job.collect_events() == []


def test_first_claim_is_started_at_epoch_zero() -> None:
    job = fresh(QUEUED)
    job.claim(W, "cuda:0", 80, 20)
    event = last_event(job)
    assert kind(event) == "Started"
    data = vars(event)
    assert (data["worker"], data["attempt"], data["device"]) == (W, 1, "cuda:0")
    assert (data["resumed_from_epoch"], data["train_size"], data["val_size"]) == (0, 80, 20)
    assert data["actor"] == W
    assert (job.status, job.worker, job.attempt) == (RUNNING, W, 1)
    assert job.started_at == event.timestamp


@pytest.mark.parametrize("status", [RUNNING, PAUSING, PAUSED, CANCELLING, *sorted(TERMINAL)])
def test_claim_only_from_queued(status: str) -> None:
    job = fresh(status)
    with pytest.raises(IllegalTransitionError):
        job.claim("other", "cpu", 1, 1)
    assert job.collect_events() == [] and job.status == status


def test_claim_after_worker_lost_is_started_from_the_checkpoint() -> None:
    job = with_checkpoint()
    first_start = job.started_at
    assert job.lose_worker(1, "reaper") is True
    assert job.status == QUEUED
    job.collect_events()
    job.claim("trainer-2", "cpu", 100, 20)
    event = last_event(job)
    assert kind(event) == "Started"
    assert (vars(event)["resumed_from_epoch"], vars(event)["attempt"]) == (1, 2)
    assert (job.worker, job.attempt, job.status) == ("trainer-2", 2, RUNNING)
    assert job.started_at == first_start


def test_claim_after_pause_and_resume_is_resumed() -> None:
    job = with_checkpoint()
    job.request_pause(USER)
    job.record_paused(W, 1, 1, "/ck/1.pt")
    job.request_resume(USER)
    job.collect_events()
    job.claim("trainer-2", "cpu", 100, 20)
    event = last_event(job)
    assert kind(event) == "Resumed"
    data = vars(event)
    assert (data["epoch"], data["checkpoint_uri"], data["worker"], data["attempt"]) == (
        1,
        "/ck/1.pt",
        "trainer-2",
        2,
    )
    assert data["actor"] == "trainer-2"
    assert (job.status, job.worker, job.attempt) == (RUNNING, "trainer-2", 2)


def test_trainer_facts_while_running() -> None:
    job = fresh(RUNNING)
    job.complete_epoch(W, 1, metrics(1, val_loss=0.9), is_best=True)
    job.complete_epoch(W, 1, metrics(2, val_loss=1.2), is_best=False)
    job.save_checkpoint(W, 1, 2, "/ck/2.pt", "ff")
    events = job.collect_events()
    assert [kind(e) for e in events] == ["EpochCompleted", "EpochCompleted", "CheckpointSaved"]
    assert vars(events[0])["total_epochs"] == 4
    assert job.status == RUNNING
    assert (job.current_epoch, job.best_epoch, job.best_val_loss) == (2, 1, 0.9)
    assert (job.checkpoint_epoch, job.checkpoint_path) == (2, "/ck/2.pt")
    assert job.last_metrics["val_loss"] == 1.2


# (status before, trainer fact, event recorded, status after)
TRAINER: list[tuple[str, str, str, str]] = [
    (RUNNING, "pause", "Paused", PAUSED),
    (PAUSING, "pause", "Paused", PAUSED),
    # Cancel asked while the trainer was pausing: the trainer stops, the cancel wins.
    (CANCELLING, "pause", "Cancelled", CANCELLED),
    (RUNNING, "complete", "Completed", COMPLETED),
    (PAUSING, "complete", "Completed", COMPLETED),
    (CANCELLING, "complete", "Completed", COMPLETED),
    (RUNNING, "fail", "Failed", FAILED),
    (CANCELLING, "fail", "Failed", FAILED),
    (RUNNING, "cancel", "Cancelled", CANCELLED),
    (PAUSING, "cancel", "Cancelled", CANCELLED),
    (CANCELLING, "cancel", "Cancelled", CANCELLED),
]


def trainer_fact(job: TrainingJob, fact: str, worker: str = W, attempt: int = 1) -> None:
    if fact == "pause":
        job.record_paused(worker, attempt, 0, "/ck/0.pt")
    elif fact == "complete":
        job.complete(worker, attempt, **RESULT)
    elif fact == "fail":
        job.fail(worker, attempt, "boom", "RuntimeError")
    elif fact == "cancel":
        job.record_cancelled(worker, attempt, 0)
    elif fact == "epoch":
        job.complete_epoch(worker, attempt, metrics(1), is_best=False)
    else:
        job.save_checkpoint(worker, attempt, 1, "/ck/1.pt", "aa")


@pytest.mark.parametrize(("before", "fact", "event", "after"), TRAINER)
def test_trainer_facts_end_a_run(before: str, fact: str, event: str, after: str) -> None:
    job = fresh(before)
    trainer_fact(job, fact)
    recorded = last_event(job)
    assert (kind(recorded), job.status, job.worker) == (event, after, None)
    assert recorded.actor == W  # type: ignore[attr-defined]
    if after in TERMINAL:
        assert job.completed_at == recorded.timestamp


def test_completed_and_failed_carry_their_results() -> None:
    done = fresh(COMPLETED)
    assert (done.best_epoch, done.best_val_loss, done.model_path) == (1, 0.5, "m")
    broken = fresh(FAILED)
    assert broken.error_message == "RuntimeError: boom"


FACTS = ("epoch", "checkpoint", "pause", "complete", "fail", "cancel")


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize(("worker", "attempt"), [("intruder", 1), (W, 2), (W, 0)])
def test_trainer_writes_from_a_stale_claim_raise(fact: str, worker: str, attempt: int) -> None:
    job = fresh(RUNNING)
    with pytest.raises(ClaimLostError):
        trainer_fact(job, fact, worker, attempt)
    assert job.collect_events() == [] and job.status == RUNNING


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("status", [QUEUED, PAUSED, *sorted(TERMINAL)])
def test_trainer_writes_without_an_active_run_raise(fact: str, status: str) -> None:
    job = fresh(status)
    with pytest.raises(ClaimLostError) as raised:
        trainer_fact(job, fact, W, job.attempt or 1)
    assert raised.value.status == status
    assert job.collect_events() == [] and job.status == status


def test_old_claim_after_worker_lost_and_new_claim_is_refused() -> None:
    job = fresh(RUNNING)
    job.lose_worker(1, "reaper")
    job.claim("trainer-2", "cpu", 1, 1)
    job.collect_events()
    with pytest.raises(ClaimLostError):
        job.complete_epoch(W, 1, metrics(1), is_best=False)
    job.complete_epoch("trainer-2", 2, metrics(1), is_best=False)
    assert kind(last_event(job)) == "EpochCompleted"


@pytest.mark.parametrize(
    ("before", "after"),
    [(RUNNING, QUEUED), (CANCELLING, CANCELLED), (PAUSING, PAUSED)],
)
def test_worker_lost_moves_the_job_on(before: str, after: str) -> None:
    job = fresh(before)
    assert job.lose_worker(1, "reaper") is True
    event = last_event(job)
    data = vars(event)
    assert (kind(event), data["worker"], data["attempt"], data["actor"]) == (
        "WorkerLost",
        W,
        1,
        "reaper",
    )
    assert (job.status, job.worker) == (after, None)
    if after == CANCELLED:
        assert job.completed_at == event.timestamp


def test_worker_lost_past_max_attempts_fails_the_job() -> None:
    job = submitted(max_attempts=2)
    job.claim("t1", "cpu", 1, 1)
    assert job.lose_worker(1, "reaper")
    assert job.status == QUEUED
    job.claim("t2", "cpu", 1, 1)
    job.collect_events()
    assert job.lose_worker(2, "reaper")
    event = last_event(job)
    assert job.status == FAILED
    assert job.completed_at == event.timestamp
    assert job.error_message is not None and "WorkerLost" in job.error_message
    with pytest.raises(IllegalTransitionError):
        job.claim("t3", "cpu", 1, 1)


def test_worker_lost_twice_for_one_attempt_is_recorded_once() -> None:
    job = fresh(RUNNING)
    assert job.lose_worker(1, "reaper-a") is True
    assert job.lose_worker(1, "reaper-b") is False
    assert [kind(e) for e in job.collect_events()] == ["WorkerLost"]
    job.claim("trainer-2", "cpu", 1, 1)
    job.collect_events()
    assert job.lose_worker(1, "reaper-a") is False  # an old attempt's loss is stale
    assert job.collect_events() == [] and job.status == RUNNING


@pytest.mark.parametrize("status", [QUEUED, PAUSED, *sorted(TERMINAL)])
def test_worker_lost_without_an_active_run_records_nothing(status: str) -> None:
    job = fresh(status)
    assert job.lose_worker(job.attempt, "reaper") is False
    assert job.collect_events() == [] and job.status == status


def full_life() -> TrainingJob:
    """Every kind of event at least once."""
    job = with_checkpoint()
    job.request_pause(USER)
    job.record_paused(W, 1, 1, "/ck/1.pt")
    job.request_resume(USER)
    job.claim("t2", "cpu", 1, 1)
    job.lose_worker(2, "reaper")
    job.claim("t3", "cpu", 1, 1)
    job.request_cancel("carol")
    job.record_cancelled("t3", 3, 1)
    job.archive("dave")
    return job


def test_every_event_carries_an_actor_and_a_utc_timestamp() -> None:
    events = full_life().collect_events()
    kinds = {kind(e) for e in events}
    assert {"Submitted", "Started", "Resumed", "WorkerLost", "Archived", "Cancelled"} <= kinds
    previous = None
    for event in events:
        assert isinstance(vars(event).get("actor"), str) and vars(event)["actor"], event
        assert event.timestamp.utcoffset() == timedelta(0), event
        assert previous is None or event.timestamp >= previous
        previous = event.timestamp


def test_started_and_completed_at_are_the_events_own_time() -> None:
    job = fresh(QUEUED)
    job.claim(W, "cpu", 1, 1)
    started = last_event(job)
    job.complete(W, 1, **RESULT)
    done = last_event(job)
    assert job.started_at == started.timestamp
    assert job.completed_at == done.timestamp
    assert job.modified_on == done.timestamp
    assert started.timestamp <= done.timestamp


def test_replaying_the_events_rebuilds_the_same_job() -> None:
    job = full_life()
    events = job.collect_events()
    rebuilt: Any = None
    for event in events:
        rebuilt = event.mutate(rebuilt)
    assert isinstance(rebuilt, TrainingJob)
    assert vars(rebuilt) == vars(job)


def test_cancel_while_pausing_is_not_lost() -> None:
    job = fresh(PAUSING)
    job.request_cancel(USER)
    assert job.status == CANCELLING
    job.record_paused(W, 1, 2, "/ck/2.pt")
    events = job.collect_events()
    assert [kind(e) for e in events] == ["CancelRequested", "Cancelled"]
    assert job.status == CANCELLED
    with pytest.raises(IllegalTransitionError):
        job.request_resume(USER)


def test_a_trainer_write_retried_after_an_outage_records_nothing_new() -> None:
    job = fresh(RUNNING)
    job.complete_epoch(W, 1, metrics(1), is_best=True)
    job.save_checkpoint(W, 1, 1, "/ck/1.pt", "abc")
    job.collect_events()
    job.complete_epoch(W, 1, metrics(1), is_best=True)
    job.save_checkpoint(W, 1, 1, "/ck/1.pt", "abc")
    assert job.collect_events() == []
    job.complete_epoch(W, 1, metrics(2), is_best=False)
    assert [kind(e) for e in job.collect_events()] == ["EpochCompleted"]


def test_a_new_attempt_may_record_an_epoch_again_from_its_checkpoint() -> None:
    job = with_checkpoint()
    job.complete_epoch(W, 1, metrics(2), is_best=False)
    job.lose_worker(1, "reaper")
    job.claim("trainer-2", "cpu", 100, 20)
    job.collect_events()
    job.complete_epoch("trainer-2", 2, metrics(2), is_best=False)
    assert [kind(e) for e in job.collect_events()] == ["EpochCompleted"]
    assert job.current_epoch == 2


def test_events_and_snapshots_stored_before_version_2_still_decode() -> None:
    """`Submitted` gained the preflight's findings and `Resumed` the device: events and
    snapshots stored without them (no `class_version`) decode with their defaults."""
    from eventsourcing.application import Application

    app = Application[Any]()
    job = submitted()
    job.claim(W, "cuda:0 (bf16)", 80, 20)
    job.record_paused(W, 1, 0, "c")
    job.request_resume(USER)
    job.claim("trainer-2", "cpu (fp32)", 80, 20)
    version_1 = []
    for domain_event in job.collect_events():
        stored = app.mapper.to_stored_event(domain_event)
        state = app.mapper.transcoder.decode(stored.state)
        assert state.pop("class_version", 1) == getattr(type(domain_event), "class_version", 1)
        for added in ("parameter_count", "warnings", "device"):
            if type(domain_event).__name__ in ("Submitted", "Resumed"):
                state.pop(added, None)
        version_1.append(dataclasses.replace(stored, state=app.mapper.transcoder.encode(state)))
    replayed: Any = None
    for stored in version_1:
        replayed = app.mapper.to_domain_event(stored).mutate(replayed)  # type: ignore[attr-defined]
    assert (replayed.parameter_count, replayed.warnings, replayed.status) == (None, [], RUNNING)
    assert replayed.device == "cuda:0 (bf16)"  # an old `Resumed` keeps the last known device
    snapshot = TrainingJob.Snapshot.take(replayed)
    state = {k: v for k, v in snapshot.state.items() if k not in ("device", "class_version")}
    old = TrainingJob.Snapshot(
        originator_id=snapshot.originator_id,
        originator_version=snapshot.originator_version,
        timestamp=snapshot.timestamp,
        topic=snapshot.topic,
        state=state,
    )
    assert old.mutate(None).device is None  # type: ignore[attr-defined]
