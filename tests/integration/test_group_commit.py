"""Group commit on PostgreSQL: concurrent submits share transactions (counted by the rows'
`xmin`, the id of the transaction that inserted them), every one is stored and projected
once, and a repeated idempotency key still makes one job."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from services.projector.replay import rebuild
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings

pytestmark = pytest.mark.postgres
CLIENTS = 40


def store(settings: Settings, batch: int) -> TrainingJobs:
    return build_app(settings.model_copy(update={"submit_batch": batch}))


def submit_together(app: TrainingJobs, n: int, key: str | None = None) -> list[str]:
    """`n` threads submit at the same moment; the ids they were answered."""
    start = threading.Barrier(n)

    def one(i: int) -> str:
        start.wait(10)
        name = "job" if key else f"job-{i}"  # a repeated key must repeat the request
        job = app.submit(name, "", {"epochs": 2}, "tester", idempotency_key=key).job
        return str(job.id)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def transactions(settings: Settings, app: TrainingJobs) -> tuple[int, int]:
    """(events stored, distinct transactions that inserted them)."""
    events_table: str = getattr(app.recorder, "events_table_name")  # noqa: B009 (not typed)
    table = sql.Identifier(settings.database_schema, events_table)
    query = sql.SQL("SELECT count(*), count(DISTINCT xmin::text) FROM {}").format(table)
    assert settings.database_url
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.fixture
def grouped(postgres_settings: Settings) -> Iterator[TrainingJobs]:
    app = store(postgres_settings, 64)
    yield app
    app.close()


def test_concurrent_submits_share_transactions_and_all_land(
    postgres_settings: Settings, grouped: TrainingJobs
) -> None:
    ids = submit_together(grouped, CLIENTS)
    assert len(set(ids)) == CLIENTS
    events, txns = transactions(postgres_settings, grouped)
    assert events == CLIENTS
    assert txns < CLIENTS / 2, f"{txns} transactions for {CLIENTS} concurrent submits"
    for job_id in ids:
        assert grouped.get_job(UUID(job_id)).status == "queued"
    reads = build_read_store(postgres_settings)
    try:
        assert rebuild(grouped, reads, grouped.recorder.max_notification_id() or 0) == CLIENTS
        assert sorted(r["id"] for r in reads.snapshot()[1]) == sorted(ids)
    finally:
        reads.close()


def test_one_transaction_per_submit_when_the_batch_is_one(postgres_settings: Settings) -> None:
    app = store(postgres_settings, 1)
    try:
        submit_together(app, 10)
        assert transactions(postgres_settings, app) == (10, 10)
    finally:
        app.close()


def test_a_repeated_idempotency_key_in_one_batch_still_makes_one_job(
    postgres_settings: Settings, grouped: TrainingJobs
) -> None:
    ids = submit_together(grouped, 20, key="the-same-key")
    assert len(set(ids)) == 1
    assert transactions(postgres_settings, grouped)[0] == 1
