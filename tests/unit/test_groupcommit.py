"""Group commit: concurrent submits share transactions, and each caller still hears its own
outcome (committed, a duplicate refused, or the store's error)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError

from shared.domainmodel import TrainingJob
from shared.groupcommit import GroupCommit

CONFIG = {"epochs": 1}


def new_job(job_id: uuid.UUID | None = None) -> TrainingJob:
    return TrainingJob(
        id=job_id or uuid.uuid4(), job_name="j", description="", config=CONFIG, actor="t"
    )


class GatedStore:
    """An in-memory eventsourcing store whose first save waits until `release()`, so that
    the callers arriving meanwhile queue up behind it."""

    def __init__(self) -> None:
        self.app: Application[uuid.UUID] = Application(
            env={"PERSISTENCE_MODULE": "eventsourcing.popo"}
        )
        self.calls: list[int] = []
        self.entered, self.gate = threading.Event(), threading.Event()

    def save(self, *events: Any) -> object:
        self.calls.append(len(events))
        if len(self.calls) == 1:
            self.entered.set()
            self.gate.wait(10)
        return self.app.save(*events)


@pytest.fixture
def store() -> Iterator[GatedStore]:
    gated = GatedStore()
    yield gated
    gated.gate.set()
    gated.app.close()


def queue_behind_first(
    commit: GroupCommit, store: GatedStore, jobs: list[TrainingJob]
) -> list[Any]:
    """Save jobs[0] (held at the gate), then the rest concurrently; outcomes in order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        first = pool.submit(commit.save, jobs[0])
        assert store.entered.wait(10)
        rest = [pool.submit(commit.save, job) for job in jobs[1:]]
        while commit._queue.qsize() < len(jobs) - 1:
            threading.Event().wait(0.005)
        store.gate.set()
        return [f.exception(10) for f in [first, *rest]]


def test_callers_arriving_during_a_save_share_the_next_transaction(store: GatedStore) -> None:
    commit = GroupCommit(store.save, max_batch=64, name="test")
    jobs = [new_job() for _ in range(11)]
    outcomes = queue_behind_first(commit, store, jobs)
    assert outcomes == [None] * 11
    assert store.calls == [1, 10]
    for job in jobs:
        assert store.app.repository.get(job.id).version == 1


def test_a_batch_never_exceeds_max_batch(store: GatedStore) -> None:
    commit = GroupCommit(store.save, max_batch=4, name="test")
    outcomes = queue_behind_first(commit, store, [new_job() for _ in range(11)])
    assert outcomes == [None] * 11
    assert store.calls == [1, 4, 4, 2]


def test_a_duplicate_fails_alone_and_the_rest_of_its_batch_is_saved(store: GatedStore) -> None:
    commit = GroupCommit(store.save, max_batch=64, name="test")
    twin = uuid.uuid4()
    jobs = [new_job(), new_job(), new_job(twin), new_job(twin), new_job()]
    outcomes = queue_behind_first(commit, store, jobs)
    assert [type(o) for o in outcomes].count(IntegrityError) == 1
    assert sum(o is None for o in outcomes) == 4
    assert store.calls[:2] == [1, 4]  # the batch of four, refused, then one by one
    for job in jobs:
        assert store.app.repository.get(job.id).version == 1


def test_every_caller_of_a_failed_batch_gets_its_error(store: GatedStore) -> None:
    failing, broken = OSError("database went away"), [True]

    def save(*events: Any) -> object:
        if store.calls and broken[0]:
            store.calls.append(len(events))
            raise failing
        return store.save(*events)

    commit = GroupCommit(save, max_batch=64, name="test")
    jobs = [new_job() for _ in range(4)]
    outcomes = queue_behind_first(commit, store, jobs)
    assert outcomes == [None, failing, failing, failing]
    assert store.calls == [1, 3]
    broken[0] = False  # the database is back: the same writer saves again
    later = new_job()
    commit.save(later)
    assert store.app.repository.get(later.id).version == 1


def test_max_batch_one_saves_in_the_callers_thread() -> None:
    threads: list[str] = []

    def save(*events: Any) -> None:
        threads.append(threading.current_thread().name)

    GroupCommit(save, max_batch=1, name="test").save(new_job())
    assert threads == [threading.current_thread().name]
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(save, max_batch=0, name="test")
