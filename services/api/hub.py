"""The WebSocket hub: every bus event to the clients watching it, through bounded queues.

The bus handler only puts into each client's queue (never awaits a client), so a slow or
dead client never holds up the others or the bus consumer; a client whose queue is full
is marked as overflowed and its session disconnects it.

When the hub may have missed messages (the bus says its queue was made again, or a
position arrives past the next one it expects), it puts a `Gap` into every queue, ahead
of what comes next: each session then sends what the store holds after its last position
before it goes on (a jump can also be a harmless hole in the positions; the store says).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.api.progress import ProgressBoard
from shared.bus import RESUBSCRIBED_KEY, TELEMETRY_KEY, Envelope, websocket_event

Message = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).isoformat()


def encode(message: Message) -> str:
    """JSON text; NaN and infinities (a diverged loss) become null, which JSON can carry."""
    return json.dumps(_finite(message), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def event_message(envelope: Envelope) -> Message:
    """A stored event as `training_<kind>` with its position; telemetry has none."""
    message: Message = {"event": websocket_event(envelope.routing_key), "job_id": envelope.job_id}
    if envelope.routing_key != TELEMETRY_KEY:
        message["position"] = envelope.position
    message["timestamp"] = envelope.timestamp.isoformat()
    if envelope.routing_key != TELEMETRY_KEY:  # telemetry is no event: no status of its own
        message["status"] = envelope.status
    message["data"] = envelope.data
    return message


def status_message(view: Message) -> Message:
    """A job's current state (its read row as the REST api returns it)."""
    return {"event": "training_status", "job_id": view["id"], "timestamp": now(), **view}


def error_message(detail: str) -> Message:
    return {"event": "error", "detail": detail, "timestamp": now()}


@dataclass(frozen=True)
class Outgoing:
    """One encoded message for clients; `position` is None for telemetry; `status` is the
    job's status after the event."""

    text: str
    job_id: str
    kind: str
    version: int
    position: int | None
    status: str

    @classmethod
    def of(cls, envelope: Envelope) -> Outgoing:
        telemetry = envelope.routing_key == TELEMETRY_KEY
        return cls(
            text=encode(event_message(envelope)),
            job_id=envelope.job_id,
            kind=envelope.kind,
            version=envelope.version,
            position=None if telemetry else envelope.position,
            status=envelope.status,
        )


class Gap:
    """In a client's queue: messages before the next one may be missing."""


GAP = Gap()


class Subscription:
    """One client's bounded queue of live messages, for one job or (job_id None) all."""

    def __init__(self, job_id: str | None, size: int) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[Outgoing | Gap] = asyncio.Queue(size)
        self.overflowed = asyncio.Event()

    def offer(self, item: Outgoing | Gap) -> None:
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed.set()


class Hub:
    """The api replica's live fan-out: subscribed to every bus message before the bus starts."""

    def __init__(self, queue_size: int = 1000, progress: ProgressBoard | None = None) -> None:
        self.queue_size = queue_size
        self.position = 0  # the highest store position relayed
        self.progress = progress or ProgressBoard()  # each running job's last step (REST)
        self._by_job: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()

    @property
    def clients(self) -> int:
        return len(self._everything) + sum(len(s) for s in self._by_job.values())

    def subscribe(self, job_id: str | None) -> Subscription:
        subscription = Subscription(job_id, self.queue_size)
        if job_id is None:
            self._everything.add(subscription)
        else:
            self._by_job.setdefault(job_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription.job_id is None:
            self._everything.discard(subscription)
            return
        watchers = self._by_job.get(subscription.job_id, set())
        watchers.discard(subscription)
        if not watchers:
            self._by_job.pop(subscription.job_id, None)

    async def relay(self, envelope: Envelope) -> None:
        """Each api replica relays every event to its WebSocket clients."""
        if envelope.routing_key == RESUBSCRIBED_KEY:
            self._may_have_missed()
            return
        self.progress.observe(envelope)
        if envelope.routing_key != TELEMETRY_KEY:
            if self.position and envelope.position > self.position + 1:
                self._may_have_missed()
            self.position = max(self.position, envelope.position)
        watchers = self._by_job.get(envelope.job_id, ())
        if not (watchers or self._everything):
            return
        item = Outgoing.of(envelope)
        for subscription in (*self._everything, *watchers):
            subscription.offer(item)

    def _may_have_missed(self) -> None:
        for subscription in (*self._everything, *(s for w in self._by_job.values() for s in w)):
            subscription.offer(GAP)
