"""The projector: follows the notification log, projects each event, then publishes it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import psycopg
from eventsourcing.persistence import Notification

from services.projector.projection import JobsProjection
from shared.application import TrainingJobs
from shared.bus import Bus, Envelope
from shared.readmodel.store import ReadStore
from shared.waiting import wait_event

log = logging.getLogger(__name__)
BATCH = 500
MAX_BACKOFF_SECONDS = 10.0


class Projector:
    """Read tables first, bus second: a client told of an event can already query it."""

    def __init__(
        self,
        app: TrainingJobs,
        store: ReadStore,
        bus: Bus,
        poll_seconds: float = 0.2,
        listen_url: str | None = None,
    ) -> None:
        self.app, self.store, self.bus = app, store, bus
        self.projection = JobsProjection(app, store)
        self.poll_seconds = poll_seconds
        self.listen_url = listen_url
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Look at the store now; safe from any thread (the embedded api's routes)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def catch_up(self) -> int:
        """Project and publish everything stored so far; returns how many were handled."""
        handled = 0
        while True:
            positions = await asyncio.to_thread(self.store.positions)
            start = min(positions["projected"], positions["published"])
            batch = await asyncio.to_thread(self._select, start)
            if not batch:
                return handled
            for notification in batch:
                await self._handle(notification, positions)
            handled += len(batch)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Follow the log until `stop`; outages are retried with backoff, never skipped."""
        self._loop = asyncio.get_running_loop()
        listener = asyncio.create_task(self._listen(stop)) if self.listen_url else None
        failures = 0
        while not stop.is_set():
            try:
                await self.catch_up()
                failures = 0
            except Exception as error:  # the store or the bus is down: retry, in order
                failures += 1
                log.warning("projector: %s; retrying (%d)", error, failures)
                await wait_event(stop, min(MAX_BACKOFF_SECONDS, 0.2 * 2**failures))
                continue
            await self._wait()
        if listener:
            listener.cancel()

    async def _handle(self, notification: Notification, positions: dict[str, int]) -> None:
        if notification.id > positions["projected"]:
            await asyncio.to_thread(self.projection.process, notification)
        if notification.id > positions["published"]:
            envelope = Envelope.of(self.app.decode(notification))
            await self.bus.publish(envelope)
            await asyncio.to_thread(self.store.record_published, notification.id)

    def _select(self, after: int) -> Sequence[Notification]:
        return self.app.recorder.select_notifications(after, BATCH, inclusive_of_start=False)

    async def _wait(self) -> None:
        await wait_event(self._wake, self.poll_seconds)
        self._wake.clear()

    async def _listen(self, stop: asyncio.Event) -> None:
        """Wake on PostgreSQL NOTIFY from eventsourcing's inserts; polling stays the fallback."""
        channel = getattr(self.app.recorder, "channel_name", "")
        assert self.listen_url is not None
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.listen_url, autocommit=True
                ) as conn:
                    await conn.execute(f'LISTEN "{channel}"')
                    async for _ in conn.notifies():
                        self.wake()
            except Exception as error:
                log.info("projector: LISTEN lost (%s); polling meanwhile", error)
                await wait_event(stop, 1.0)
