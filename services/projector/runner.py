"""The projector: follows the notification log, projects each event, then publishes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
from eventsourcing.persistence import Notification

from services.projector.projection import JobsProjection
from shared.application import TrainingJobs
from shared.bus import WORK_KEYS, Bus, Envelope, work_queue
from shared.domainmodel import QUEUED
from shared.logs import job_context
from shared.metrics import EVENTS_PROJECTED, EVENTS_PUBLISHED
from shared.readmodel.shapes import JobState
from shared.readmodel.store import ReadStore
from shared.waiting import retrying_until, wait_event

log = logging.getLogger(__name__)
BATCH = 500
PROJECTING = "projecting"


class Projector:
    """Read tables first, bus second: a client told of an event can already query it."""

    def __init__(
        self,
        app: TrainingJobs,
        store: ReadStore,
        bus: Bus,
        poll_seconds: float = 0.2,
        listen_url: str | None = None,
        sweep_seconds: float = 30.0,
    ) -> None:
        self.app, self.store, self.bus = app, store, bus
        self.projection = JobsProjection(app, store)
        self.poll_seconds, self.sweep_seconds = poll_seconds, sweep_seconds
        self.listen_url = listen_url
        self._wake = asyncio.Event()
        self._published_wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Told each projected position, on the event loop (an embedded api's read waits).
        self.projected_hooks: list[Callable[[int], None]] = []
        self._faulted = True  # a fault left by an earlier run is cleared by the first success

    def wake(self) -> None:
        """Look at the store now; safe from any thread (the embedded api's routes)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def catch_up(self) -> int:
        """Project, then publish, everything stored so far; returns how many were projected."""
        projected = await self.project_pending()
        await self.publish_pending()
        return projected

    async def project_pending(self) -> int:
        """Apply every stored event the read tables lack, in order: each page the store
        gives in one transaction (exactly once: the position moves in the same one)."""
        handled = 0
        while True:
            batch, projected = await asyncio.to_thread(self._project_next)
            if not batch:
                return handled
            if projected is None:  # the page failed: one at a time, a failure names its event
                for notification in batch:
                    with job_context(notification.originator_id):
                        await self._project(notification)
            else:
                EVENTS_PROJECTED.inc(projected)
                if projected and log.isEnabledFor(logging.DEBUG):
                    for notification in batch:
                        with job_context(notification.originator_id):
                            log.debug("projected position %d", notification.id)
                self._projected(batch[-1].id)
            handled += len(batch)

    def _project_next(self) -> tuple[Sequence[Notification], int | None]:
        """The next page past the projected position, applied in one transaction: the page
        and how many of its events were projected (0: another projector did), or None when
        applying it raised (nothing of it was applied). Blocking: one thread hop."""
        batch = self._select(self.store.positions()["projected"])
        if not batch:
            return batch, 0
        try:
            return batch, self.projection.process_batch(batch)
        except Exception as error:
            log.debug("projecting positions %d-%d at once: %r", batch[0].id, batch[-1].id, error)
            return batch, None

    async def _project(self, notification: Notification) -> None:
        """One event; its log lines (a failure included) carry its job id. A failure is
        recorded as the projector's fault (for /health and /metrics) before it is raised
        and retried; the event is never skipped."""
        try:
            if await asyncio.to_thread(self.projection.process, notification):
                EVENTS_PROJECTED.inc()
                log.debug("projected position %d", notification.id)
            self._projected(notification.id)
        except Exception as error:
            log.warning("projecting position %d failed: %r", notification.id, error)
            with contextlib.suppress(Exception):  # the read store itself may be down
                await asyncio.to_thread(
                    self.store.record_fault, PROJECTING, notification.id, repr(error)
                )
                self._faulted = True
            raise

    def _projected(self, position: int) -> None:
        if self._faulted:  # past what it was stuck on
            self.store.clear_fault(PROJECTING)
            self._faulted = False
        for hook in self.projected_hooks:
            hook(position)

    async def publish_pending(self) -> int:
        """Publish, in order, every projected event the bus has not confirmed yet; the
        published position is recorded once a page (a crash re-publishes at most that page:
        consumers dedupe by position)."""
        published = 0
        while True:
            batch = await asyncio.to_thread(self._to_publish)
            if not batch:
                return published
            confirmed = 0
            try:
                for notification in batch:
                    envelope = Envelope.of(self.app.decode(notification))
                    await self.bus.publish(envelope)
                    work = await self._work_for(envelope)
                    if work is not None:
                        await self.bus.publish(work)
                    confirmed = notification.id
                    EVENTS_PUBLISHED.inc()
                    published += 1
            finally:
                if confirmed:
                    await asyncio.to_thread(self.store.record_published, confirmed)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Follow the log until `stop`. Projecting and publishing are separate loops: the
        read tables stay current while RabbitMQ is down, and the bus catches up after.
        Outages are retried with backoff, never skipped."""
        self._loop = asyncio.get_running_loop()
        listener = asyncio.create_task(self._listen(stop)) if self.listen_url else None
        publisher = asyncio.create_task(
            self._follow(stop, self.publish_pending, self._published_wake, "publishing")
        )
        sweeper = asyncio.create_task(self._sweep_forever(stop))
        try:
            await self._follow(stop, self._project_then_nudge, self._wake, "projecting")
        finally:
            for task in (listener, publisher, sweeper):
                if task:
                    task.cancel()
            await asyncio.gather(publisher, return_exceptions=True)

    async def _project_then_nudge(self) -> int:
        handled = await self.project_pending()
        if handled:
            self._published_wake.set()
        return handled

    async def _follow(
        self,
        stop: asyncio.Event,
        step: Callable[[], Awaitable[int]],
        wake: asyncio.Event,
        what: str,
    ) -> None:
        while not stop.is_set():
            try:
                async for attempt in retrying_until(stop, f"projector {what}"):
                    with attempt:
                        await step()
            except Exception as error:
                log.info("projector %s stopped: %r", what, error)
                return
            await wait_event(wake, self.poll_seconds)
            wake.clear()

    async def _work_for(self, envelope: Envelope) -> Envelope | None:
        """The work message that follows an event leaving its job runnable, routed by what
        the job needs (its config, from the event or else from the job's row)."""
        if envelope.routing_key not in WORK_KEYS or envelope.status != QUEUED:
            return None
        config = envelope.data.get("config")
        if not isinstance(config, dict):
            row = await asyncio.to_thread(self.store.get_job, envelope.job_id)
            if row is None:
                return None
            config = JobState.model_validate(row).config
        return Envelope.work(envelope.job_id, work_queue(config), envelope.position)

    async def sweep(self, waited: float | None = None) -> int:
        """Publish again the work messages of runnable jobs that may have none: for each work
        queue, when it holds fewer ready messages than it has jobs queued for longer than
        `waited` seconds (default `sweep_seconds`), every one of those jobs gets a message
        (a duplicate is harmless: the trainer that takes it finds the job claimed, acks
        and drops it). Returns how many it published. It never trains anything."""
        depths = await self.bus.work_depths()
        age = self.sweep_seconds if waited is None else waited
        cutoff = datetime.now(UTC) - timedelta(seconds=age)
        rows = await asyncio.to_thread(self.store.runnable_jobs, cutoff.isoformat())
        waiting: dict[str, list[str]] = {}
        for row in rows:
            state = JobState.model_validate(row)
            waiting.setdefault(work_queue(state.config), []).append(state.id)
        published = 0
        for queue, job_ids in waiting.items():
            if depths[queue].ready >= len(job_ids):
                continue
            log.warning(
                "work queue %s holds %d messages for %d runnable jobs: publishing theirs again",
                queue,
                depths[queue].ready,
                len(job_ids),
            )
            for job_id in job_ids:
                await self.bus.publish(Envelope.work(job_id, queue, actor="sweep"))
                published += 1
        return published

    async def _sweep_forever(self, stop: asyncio.Event) -> None:
        """The first sweep counts every runnable job, however recent: after a restart an
        in-process bus holds nothing, and a job handed back by a stopping trainer just
        before should not wait a sweep period to run again."""
        waited: float | None = 0.0
        while not stop.is_set():
            try:
                await self.sweep(waited)
                waited = None
            except Exception as error:
                log.info("projector: sweep skipped (%r)", error)
            await wait_event(stop, self.sweep_seconds)

    def _select(self, after: int) -> Sequence[Notification]:
        return self.app.recorder.select_notifications(after, BATCH, inclusive_of_start=False)

    def _to_publish(self) -> Sequence[Notification]:
        """The next page of projected events past the published position. Blocking."""
        positions = self.store.positions()
        if positions["published"] >= positions["projected"]:
            return ()
        page = self._select(positions["published"])
        return [n for n in page if n.id <= positions["projected"]]

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
