"""The bus: one envelope, one routing table, one interface, and the in-process bus."""

from __future__ import annotations

import asyncio
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from shared.application import StoredJobEvent
from shared.domainmodel import RUNNING

log = logging.getLogger(__name__)

ROUTING_KEYS = {
    "Submitted": "training.submitted",
    "PauseRequested": "training.pause_requested",
    "ResumeRequested": "training.resume_requested",
    "CancelRequested": "training.cancel_requested",
    "Started": "training.started",
    "EpochCompleted": "training.progress",
    "CheckpointSaved": "training.checkpoint_saved",
    "Paused": "training.paused",
    "Preempted": "training.preempted",
    "Resumed": "training.resumed",
    "Completed": "training.completed",
    "Failed": "training.failed",
    "Cancelled": "training.cancelled",
    "WorkerLost": "training.worker_lost",
    "Archived": "training.archived",
    "Continued": "training.continued",
}
# Events after which a job may be runnable: trainers compete for them on one queue.
WORK_KEYS = (
    "training.submitted",
    "training.resume_requested",
    "training.worker_lost",
    "training.preempted",
)
# Events a running trainer must notice soon: every trainer hears them.
NUDGE_KEYS = ("training.pause_requested", "training.cancel_requested")
# Live telemetry between epochs: on the bus for watchers, never in the store.
TELEMETRY_KEY = "training.step"
# Not a message on the broker: the bus tells a fan-out subscriber its queue was made again,
# so messages published before may never reach it (a subscriber that must see them all
# reads them from the store).
RESUBSCRIBED_KEY = "bus.resubscribed"
ALL_KEYS = ("training.#",)


def routing_key(kind: str) -> str:
    return ROUTING_KEYS[kind]


def websocket_event(key: str) -> str:
    """`training.progress` → `training_progress`, the name WebSocket clients see."""
    return key.replace(".", "_", 1)


class Envelope(BaseModel):
    """One stored event as it travels on the bus (message id = position)."""

    position: int
    job_id: str
    version: int
    kind: str
    routing_key: str
    timestamp: datetime
    actor: str
    data: dict[str, Any]
    status: str  # the job's status after the event, as the aggregate computed it

    @classmethod
    def of(cls, event: StoredJobEvent) -> Envelope:
        return cls(
            position=event.position,
            job_id=str(event.job_id),
            version=event.version,
            kind=event.kind,
            routing_key=routing_key(event.kind),
            timestamp=event.timestamp,
            actor=event.actor,
            data=event.data,
            status=event.status,
        )

    @classmethod
    def step(cls, job_id: str, worker: str, data: dict[str, Any]) -> Envelope:
        """Live telemetry: not a stored event, so no position (0) and no version."""
        return cls(
            position=0,
            job_id=job_id,
            version=0,
            kind="Step",
            routing_key=TELEMETRY_KEY,
            timestamp=datetime.now(UTC),
            actor=worker,
            data=data,
            status=RUNNING,
        )

    @classmethod
    def resubscribed(cls) -> Envelope:
        """The bus's notice to a fan-out subscriber: its queue is back, possibly after a gap."""
        return cls(
            position=0,
            job_id="",
            version=0,
            kind="Resubscribed",
            routing_key=RESUBSCRIBED_KEY,
            timestamp=datetime.now(UTC),
            actor="bus",
            data={},
            status="",
        )


Handler = Callable[[Envelope], Awaitable[None]]


class Bus(ABC):
    """Publish envelopes; subscribe a competing work queue or a private fan-out queue."""

    @abstractmethod
    def subscribe_work(self, handler: Handler) -> None:
        """Runnable-job messages, each to one subscriber of all (call before start)."""

    @abstractmethod
    def subscribe_fanout(self, keys: Sequence[str], handler: Handler) -> None:
        """Every message matching `keys`, to this subscriber (call before start). A bus that
        can lose a subscriber's messages (its queue gone with its connection) also hands
        it `Envelope.resubscribed()` each time the queue is back: what was published
        before may be missing. A bus that cannot lose them never does."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def publish(self, envelope: Envelope) -> None:
        """Returns once the bus holds the message (publisher confirm on RabbitMQ)."""

    @abstractmethod
    async def publish_telemetry(self, envelope: Envelope) -> None:
        """Fire and forget to the fan-outs: transient, unconfirmed, dropped if unroutable."""

    @abstractmethod
    async def healthy(self) -> bool: ...


def matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` is zero or more."""
    return _match(pattern.split("."), key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words or (head != "*" and head != words[0]):
        return False
    return _match(rest, words[1:])


class InProcessBus(Bus):
    """The embedded run's bus: same routing, delivered on the running event loop."""

    def __init__(self) -> None:
        self._work: list[Handler] = []
        self._fanout: list[tuple[tuple[str, ...], Handler]] = []
        self._turn = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribe_work(self, handler: Handler) -> None:
        self._work.append(handler)

    def subscribe_fanout(self, keys: Sequence[str], handler: Handler) -> None:
        self._fanout.append((tuple(keys), handler))

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def publish(self, envelope: Envelope) -> None:
        key = envelope.routing_key
        if key in WORK_KEYS and self._work:
            self._deliver(self._work[next(self._turn) % len(self._work)], envelope)
        for keys, handler in self._fanout:
            if any(matches(k, key) for k in keys):
                self._deliver(handler, envelope)

    async def publish_telemetry(self, envelope: Envelope) -> None:
        for keys, handler in self._fanout:
            if any(matches(k, envelope.routing_key) for k in keys):
                self._deliver(handler, envelope)

    async def healthy(self) -> bool:
        return True

    def _deliver(self, handler: Handler, envelope: Envelope) -> None:
        task = asyncio.get_running_loop().create_task(self._run(handler, envelope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(handler: Handler, envelope: Envelope) -> None:
        try:
            await handler(envelope)
        except Exception:
            log.exception("handler failed for %s at %s", envelope.kind, envelope.position)
