"""Batched projection (what replay uses) gives the same tables as one event at a time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.projector.projection import JobsProjection
from services.projector.replay import fresh_store
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.readmodel.postgres import COPY_FROM_ROWS
from shared.readmodel.schema import METRIC_COLUMNS
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from tests.integration.test_store_and_projection import epoch, mixed_workload, submit

Store = tuple[TrainingJobs, ReadStore]


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    app, reads = build_app(settings), build_read_store(settings)
    yield app, reads
    reads.close()
    app.close()


def workload(app: TrainingJobs) -> None:
    """Every kind of event, plus a job whose epochs are recorded again after a lost worker."""
    mixed_workload(app)
    again = submit(app, epochs=5)
    app.change(again, lambda job: job.claim("t1", "cpu", 80, 20))
    for n in (1, 2, 3):
        app.change(again, epoch("t1", 1, n, best=n == 1))
    app.change(again, lambda job: job.lose_worker(1, "t2"))
    app.change(again, lambda job: job.claim("t2", "cpu", 80, 20))
    app.change(again, epoch("t2", 2, 2, best=True))


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_batches_equal_single_events(store: Store, settings: Settings, size: int) -> None:
    app, reads = store
    workload(app)
    notifications = app.recorder.select_notifications(0, 1000)
    one_by_one = JobsProjection(app, reads)
    assert all(one_by_one.process(n) for n in notifications)
    with fresh_store(settings) as fresh:
        batched = JobsProjection(app, fresh)
        for start in range(0, len(notifications), size):
            chunk = notifications[start : start + size]
            assert batched.process_batch(chunk) == len(chunk)
        assert fresh.snapshot() == reads.snapshot()


def test_a_batch_already_projected_changes_nothing(store: Store) -> None:
    app, reads = store
    workload(app)
    notifications = app.recorder.select_notifications(0, 1000)
    projection = JobsProjection(app, reads)
    assert projection.process_batch(notifications) == len(notifications)
    before = reads.snapshot()
    assert JobsProjection(app, reads).process_batch(notifications[-3:]) == 0
    assert projection.process_batch(notifications[:2]) == 0
    assert projection.process_batch([]) == 0
    assert reads.snapshot() == before


@pytest.mark.parametrize("rows", [3, COPY_FROM_ROWS * 4])
def test_upsert_many_equals_one_upsert_after_another(
    store: Store, settings: Settings, rows: int
) -> None:
    """Under COPY_FROM_ROWS a plain upsert per row; from it (PostgreSQL) COPY into a staging
    table, then one upsert: both leave the last row of each key, and update existing ones."""
    _, reads = store
    moment = "2026-11-29T00:00:00+00:00"
    metric = dict.fromkeys(METRIC_COLUMNS) | {"recorded_at": moment, "timestamp": moment}
    existing = {**metric, "job_id": "j0", "epoch": 0, "train_loss": 9.0, "position": 1}
    batch = [
        {**metric, "job_id": f"j{i % 5}", "epoch": i % 7, "train_loss": float(i), "position": i}
        for i in range(rows)
    ]
    expected: dict[tuple[str, int], dict[str, object]] = {}
    for row in [existing, *batch]:
        expected[(str(row["job_id"]), int(str(row["epoch"])))] = row
    with reads.transaction() as tx:
        tx.upsert_many("training_metrics", METRIC_COLUMNS, ("job_id", "epoch"), [existing])
    with reads.transaction() as tx:
        tx.upsert_many("training_metrics", METRIC_COLUMNS, ("job_id", "epoch"), batch)
        tx.upsert_many("training_metrics", METRIC_COLUMNS, ("job_id", "epoch"), batch[:1])
    _, _, stored = reads.snapshot()
    by_key = {(r["job_id"], r["epoch"]): r for r in stored}
    assert by_key == expected | {("j0", 0): batch[0]}
