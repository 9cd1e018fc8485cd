"""Group commit: new aggregates saved by many threads at once go out in shared transactions."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import IntegrityError

Events = Sequence[DomainEventProtocol[UUID]]
_Pending = tuple[Events, "Future[int]"]


class GroupCommit:
    """Saves what concurrent callers hand in, up to `max_batch` at a time in one `save()`.

    eventsourcing's PostgreSQL recorder locks the events table for every insert, so
    concurrent saves queue on that lock, and each waits for a WAL flush of its own. One
    writer thread instead saves everything that arrived while the last transaction ran:
    one lock and one flush for all of them. Nothing waits for a batch to fill: an idle
    writer saves the first arrival at once. Each caller returns only when the transaction
    that holds its events has committed, or raises what that transaction raised. A batch
    refused for an IntegrityError (a reused id, say a repeated idempotency key) is saved
    again one caller at a time, so only the duplicate fails.
    """

    def __init__(self, save: Callable[..., Any], max_batch: int, name: str) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._save, self.max_batch, self.name = save, max_batch, name
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def save(self, aggregate: Aggregate) -> int:
        """Save the aggregate's pending events; returns, once they are committed, the store
        position of the last of them."""
        events = list(aggregate.collect_events())
        if self.max_batch == 1:
            return _last_position(events, self._save(*events))
        done: Future[int] = Future()
        self._queue.put((events, done))
        self._start_writer()
        return done.result()

    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._writer.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            recordings = self._save(*(event for events, _ in batch for event in events))
        except IntegrityError as error:
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            for pending in batch:
                self._commit([pending])
            return
        except BaseException as error:  # the callers decide what it means (503, 500)
            for _, done in batch:
                done.set_exception(error)
            return
        for events, done in batch:
            done.set_result(_last_position(events, recordings))


def _last_position(events: Events, recordings: Any) -> int:
    """The highest store position that `recordings` (eventsourcing's `Recording`s) gave
    to `events`."""
    mine = {id(event) for event in events}
    positions = [r.notification.id for r in recordings or () if id(r.domain_event) in mine]
    return max(positions, default=0)
