"""A command's read wait ends when the projector's commit is announced (PostgreSQL NOTIFY on
the read tables' channel), not at the api's next poll; a lost LISTEN connection comes back.

The poller is slowed to 30 s here, so only the announcement can end a wait in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from services.api import freshness as freshness_module
from services.api.freshness import ReadFreshness
from services.projector.projection import JobsProjection
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from tests.conftest import POSTGRES_URL
from tests.integration.test_store_and_projection import submit

pytestmark = pytest.mark.postgres
SLOW_POLL = 30.0
WITHIN = 5.0


async def _until(condition: object, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


@pytest.fixture
async def listening(
    postgres_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[TrainingJobs, ReadStore, ReadFreshness]]:
    monkeypatch.setattr(freshness_module, "POLL_SECONDS", SLOW_POLL)
    monkeypatch.setattr(freshness_module, "POLL_SECONDS_LISTENING", SLOW_POLL)
    monkeypatch.setattr(freshness_module, "RELISTEN_SECONDS", 0.1)
    app, reads = build_app(postgres_settings), build_read_store(postgres_settings)
    assert reads.projected_channel is not None
    freshness = ReadFreshness(reads, wait_seconds=20)
    stop = asyncio.Event()
    listener = asyncio.create_task(
        freshness.listen_forever(POSTGRES_URL, reads.projected_channel, stop)
    )
    try:
        await _until(lambda: freshness.listening)
        yield app, reads, freshness
    finally:
        stop.set()
        await asyncio.wait_for(listener, 5)
        reads.close()
        app.close()


async def _wait_then_project(app: TrainingJobs, reads: ReadStore, freshness: ReadFreshness) -> None:
    """Submit, start the wait (its first poll sees the position missing), then project."""
    job_id = submit(app, epochs=1)
    head = app.recorder.max_notification_id() or 0
    waiter = asyncio.create_task(freshness.require(head))
    await asyncio.sleep(0.2)  # the waiter's first poll has run and found nothing
    assert not waiter.done()
    pending = app.recorder.select_notifications(freshness.projected, 100, inclusive_of_start=False)
    await asyncio.to_thread(JobsProjection(app, reads).process_batch, pending)
    await asyncio.wait_for(waiter, WITHIN)
    assert freshness.projected == head, job_id


async def test_a_read_wait_ends_when_the_projection_commits(
    listening: tuple[TrainingJobs, ReadStore, ReadFreshness],
) -> None:
    await _wait_then_project(*listening)


async def test_a_killed_listen_connection_comes_back_and_still_ends_waits(
    listening: tuple[TrainingJobs, ReadStore, ReadFreshness],
) -> None:
    app, reads, freshness = listening
    query = "SELECT pid FROM pg_stat_activity WHERE query = %s"
    listen = [f'LISTEN "{reads.projected_channel}"']
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as admin:
        [(first,)] = await (await admin.execute(query, listen)).fetchall()
        await admin.execute("SELECT pg_terminate_backend(%s)", [first])
        for _ in range(500):
            pids = [row[0] for row in await (await admin.execute(query, listen)).fetchall()]
            if pids and first not in pids and freshness.listening:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no new LISTEN connection after {first} was terminated")
    await _wait_then_project(app, reads, freshness)
