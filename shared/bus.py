"""The bus: one envelope, one routing table, one interface, and the in-process bus."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel

from shared.application import StoredJobEvent
from shared.domainmodel import QUEUED, RUNNING
from shared.logs import job_context

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
# Events after which a job may be runnable: each one that leaves its job queued is
# followed on the bus by one work message, routed by what the job needs (DESIGN §1).
WORK_KEYS = (
    "training.submitted",
    "training.resume_requested",
    "training.worker_lost",
    "training.preempted",
)
# What a job needs (its config's `accelerator`) → the work queue that carries its message.
WORK_QUEUE_OF_ACCELERATOR = {"auto": "any", "cpu": "cpu", "gpu": "gpu"}
# What a trainer has → the work queues it consumes: a job that asked for `auto` runs on
# either kind; one that asked for a kind waits for a trainer of that kind.
WORK_QUEUES_OF_TRAINER = {"cpu": ("cpu", "any"), "gpu": ("gpu", "any")}
WORK_QUEUES = tuple(dict.fromkeys(WORK_QUEUE_OF_ACCELERATOR.values()))
ACCELERATOR_OF_WORK_QUEUE = {queue: acc for acc, queue in WORK_QUEUE_OF_ACCELERATOR.items()}
WORK_PREFIX = "work."
# Events a running trainer must notice soon: every trainer hears them.
NUDGE_KEYS = ("training.pause_requested", "training.cancel_requested")
# Live telemetry between epochs: on the bus for watchers, never in the store.
TELEMETRY_KEY = "training.step"
# A work message that asks a trainer to join a multi-node group rather than claim a job.
JOIN_KIND = "JoinGroup"
# Not a message on the broker: the bus tells a fan-out subscriber its queue was made again,
# so messages published before may never reach it (a subscriber that must see them all
# reads them from the store).
RESUBSCRIBED_KEY = "bus.resubscribed"
ALL_KEYS = ("training.#",)


def routing_key(kind: str) -> str:
    return ROUTING_KEYS[kind]


def work_key(queue: str) -> str:
    """`gpu` → `work.gpu`, the routing key of that work queue's messages."""
    return WORK_PREFIX + queue


def is_work(key: str) -> bool:
    return key.startswith(WORK_PREFIX)


def work_queue(config: Mapping[str, Any]) -> str:
    """The work queue of a job with this (validated) config: `any`, `cpu` or `gpu`."""
    return WORK_QUEUE_OF_ACCELERATOR[str(config.get("accelerator", "auto"))]


class WorkDepth(NamedTuple):
    """One work queue as the broker counts it: messages ready, trainers consuming."""

    ready: int
    consumers: int


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
    def work(cls, job_id: str, queue: str, position: int = 0, actor: str = "projector") -> Envelope:
        """A job is runnable: the message a trainer of `queue` claims it by. `position` is
        the event that made it runnable (0 for a sweep's republish)."""
        return cls(
            position=position,
            job_id=job_id,
            version=0,
            kind="Runnable",
            routing_key=work_key(queue),
            timestamp=datetime.now(UTC),
            actor=actor,
            data={"queue": queue},
            status=QUEUED,
        )

    @classmethod
    def join(cls, job_id: str, queue: str, attempt: int, endpoint: str, actor: str) -> Envelope:
        """Run a share of `attempt` of a multi-node job: the trainer that claimed it asks
        for each other node with one of these on the job's work queue; the trainer that
        takes it joins the group's c10d rendezvous at `endpoint` (host:port)."""
        return cls(
            position=0,
            job_id=job_id,
            version=0,
            kind=JOIN_KIND,
            routing_key=work_key(queue),
            timestamp=datetime.now(UTC),
            actor=actor,
            data={"queue": queue, "attempt": attempt, "endpoint": endpoint},
            status=RUNNING,
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
# A work handler claims the job its message names. It returns the job's run (awaited
# after the message is acked, with no other work delivered to it meanwhile), or None
# when the job is not its to run (acked and dropped); it raises to have the message
# delivered again later (a store outage, say).
WorkHandler = Callable[[Envelope], Awaitable[Awaitable[None] | None]]


class Bus(ABC):
    """Publish envelopes; subscribe competing work queues or a private fan-out queue."""

    @abstractmethod
    def subscribe_work(self, handler: WorkHandler, queues: Sequence[str] = WORK_QUEUES) -> None:
        """Work messages of `queues` (call before start), each to one subscriber of all,
        one at a time: a subscriber gets its next message only once the last one's run
        (see `WorkHandler`) has ended."""

    @abstractmethod
    async def stop_work(self) -> None:
        """Deliver no more work to this process's work subscribers (a stopping trainer);
        a message they hold unclaimed goes back to its queue."""

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
        """Returns once the bus holds the message (publisher confirm on RabbitMQ). A work
        message (`Envelope.work`) goes to its work queue only; any other, to the fan-outs."""

    @abstractmethod
    async def publish_telemetry(self, envelope: Envelope) -> None:
        """Fire and forget to the fan-outs: transient, unconfirmed, dropped if unroutable."""

    @abstractmethod
    async def healthy(self) -> bool: ...

    @abstractmethod
    async def work_depths(self) -> dict[str, WorkDepth]:
        """Each work queue's ready messages and consumers; raises when the bus cannot tell."""


async def _ran(run: Awaitable[None], envelope: Envelope) -> None:
    """Await a claimed job's run; its failure is the run's to record, so only logged here."""
    try:
        await run
    except Exception:
        log.exception("the run of job %s failed", envelope.job_id)


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


class _Taker:
    """One work subscriber of the in-process bus, busy while a message of its is handled."""

    def __init__(self, handler: WorkHandler, queues: Sequence[str]) -> None:
        self.handler, self.queues, self.busy, self.closed = handler, tuple(queues), False, False


class InProcessBus(Bus):
    """The embedded run's bus: same routing, delivered on the running event loop. Work
    messages wait in memory, per work queue, for a free subscriber of that queue; a
    handler that raises has its message put back at the head after `retry_seconds`."""

    def __init__(self, retry_seconds: float = 1.0) -> None:
        self._work: list[_Taker] = []
        self._pending: dict[str, deque[Envelope]] = {q: deque() for q in WORK_QUEUES}
        self._fanout: list[tuple[tuple[str, ...], Handler]] = []
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_seconds = retry_seconds

    def subscribe_work(self, handler: WorkHandler, queues: Sequence[str] = WORK_QUEUES) -> None:
        self._work.append(_Taker(handler, queues))

    async def stop_work(self) -> None:
        for taker in self._work:
            taker.closed = True

    def subscribe_fanout(self, keys: Sequence[str], handler: Handler) -> None:
        self._fanout.append((tuple(keys), handler))

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def publish(self, envelope: Envelope) -> None:
        key = envelope.routing_key
        if is_work(key):
            self._pending[key.removeprefix(WORK_PREFIX)].append(envelope)
            self._pump()
            return
        for keys, handler in self._fanout:
            if any(matches(k, key) for k in keys):
                self._spawn(self._run(handler, envelope))

    async def publish_telemetry(self, envelope: Envelope) -> None:
        for keys, handler in self._fanout:
            if any(matches(k, envelope.routing_key) for k in keys):
                self._spawn(self._run(handler, envelope))

    async def healthy(self) -> bool:
        return True

    async def work_depths(self) -> dict[str, WorkDepth]:
        return {
            q: WorkDepth(len(waiting), sum(q in t.queues and not t.closed for t in self._work))
            for q, waiting in self._pending.items()
        }

    def _pump(self) -> None:
        """Hand each free subscriber, in turn, the oldest message of its first queue that
        has one."""
        count = len(self._work)
        for offset in range(count):
            taker = self._work[(self._turn + offset) % count]
            if taker.busy or taker.closed:
                continue
            queue = next((q for q in taker.queues if self._pending[q]), None)
            if queue is None:
                continue
            taker.busy = True
            self._turn = (self._turn + offset + 1) % count
            self._spawn(self._take(taker, queue, self._pending[queue].popleft()))

    async def _take(self, taker: _Taker, queue: str, envelope: Envelope) -> None:
        try:
            try:
                with job_context(envelope.job_id):
                    run = await taker.handler(envelope)
            except Exception:
                with job_context(envelope.job_id):
                    log.exception("work handler failed for job %s", envelope.job_id)
                await asyncio.sleep(self._retry_seconds)
                self._pending[queue].appendleft(envelope)
                return
            if run is not None:
                await _ran(run, envelope)
        finally:
            taker.busy = False
            self._pump()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(handler: Handler, envelope: Envelope) -> None:
        try:
            await handler(envelope)
        except Exception:
            log.exception("handler failed for %s at %s", envelope.kind, envelope.position)
