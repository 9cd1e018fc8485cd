"""The api's database watch keeps probing while its request threads are all busy.

A burst of submits of models not probed yet holds every worker thread waiting on the
model-probe child; a watch whose probe queued behind them timed out and declared a
PostgreSQL outage that was not happening (false 503s for 4-7 s, /health degraded).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.api.availability import PROBE_SECONDS, DatabaseWatch
from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.postgres
BUSY_SECONDS = 3.0
THREADS = 64


async def test_busy_worker_threads_do_not_make_the_watch_declare_an_outage() -> None:
    watch = DatabaseWatch(POSTGRES_URL)
    stop = asyncio.Event()
    running = asyncio.create_task(watch.run_forever(stop))
    release = threading.Event()
    try:
        await asyncio.sleep(4 * PROBE_SECONDS)
        assert watch.down is None, watch.down
        # Every thread of the loop's executor blocked, as by submits waiting on a probe.
        busy = [asyncio.to_thread(release.wait, BUSY_SECONDS) for _ in range(THREADS)]
        blocked = asyncio.gather(*busy)
        seen: list[str] = []
        for _ in range(int(BUSY_SECONDS / 0.05) - 10):
            if watch.down is not None:
                seen.append(watch.down)
            await asyncio.sleep(0.05)
        release.set()
        await blocked
        assert seen == [], f"declared down while PostgreSQL answered: {seen[:3]}"
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(running, 5)
