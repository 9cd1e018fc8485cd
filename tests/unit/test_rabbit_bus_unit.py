"""RabbitBus routing in memory, with FastStream's TestRabbitBroker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from faststream.rabbit import RabbitExchange, TestRabbitBroker, testing
from faststream.rabbit.subscriber import RabbitSubscriber

from services.asyncapi import asyncapi_json
from shared.bus import ALL_KEYS, NUDGE_KEYS, ROUTING_KEYS, WORK_QUEUES, Envelope, matches, work_key
from shared.rabbit import RabbitBus

DOCS = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


class Inbox:
    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def __call__(self, envelope: Envelope) -> None:
        self.received.append(envelope)

    @property
    def keys(self) -> list[str]:
        return [e.routing_key for e in self.received]


def envelope(position: int, kind: str) -> Envelope:
    return Envelope(
        position=position,
        job_id=str(uuid.uuid4()),
        version=1,
        kind=kind,
        routing_key=ROUTING_KEYS[kind],
        timestamp=datetime.now(UTC),
        actor="test",
        data={"epoch": position},
        status="queued",
    )


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> RabbitBus:
    """TestRabbitBroker matches one routing key per queue; the bus binds several."""
    bus = RabbitBus("amqp://guest:guest@localhost:5672/", f"test.{uuid.uuid4().hex}")
    single = testing._is_handler_matches

    def is_handler_matches(
        handler: RabbitSubscriber,
        routing_key: str,
        headers: Mapping[Any, Any] | None = None,
        exchange: RabbitExchange | None = None,
    ) -> bool:
        keys = bus.bindings().get(handler.queue.name)
        if keys is None:
            return single(handler, routing_key, headers, exchange)
        return any(matches(key, routing_key) for key in keys)

    monkeypatch.setattr(testing, "_is_handler_matches", is_handler_matches)
    return bus


@pytest.fixture
async def inboxes(bus: RabbitBus) -> AsyncIterator[dict[str, Inbox]]:
    inboxes = {"work": Inbox(), "nudges": Inbox(), "all": Inbox()}
    bus.subscribe_work(inboxes["work"])
    bus.subscribe_fanout(NUDGE_KEYS, inboxes["nudges"])
    bus.subscribe_fanout(ALL_KEYS, inboxes["all"])
    async with TestRabbitBroker(bus.broker):
        await bus.start()
        yield inboxes


async def test_work_reaches_the_work_queues_and_events_the_fanouts_only(
    bus: RabbitBus, inboxes: dict[str, Inbox]
) -> None:
    sent = [envelope(p, kind) for p, kind in enumerate(ROUTING_KEYS, start=1)]
    for item in sent:
        await bus.publish(item)
    work = [Envelope.work(str(uuid.uuid4()), queue, 100 + n) for n, queue in enumerate(WORK_QUEUES)]
    for item in work:
        await bus.publish(item)
    deadline = time.monotonic() + 5  # a trainer's gate claims after a short gathering wait
    while len(inboxes["work"].keys) < len(work) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert inboxes["work"].keys == [work_key(queue) for queue in WORK_QUEUES]
    assert inboxes["nudges"].keys == [k for k in ROUTING_KEYS.values() if k in NUDGE_KEYS]
    assert inboxes["all"].received == sent


def test_the_bus_binds_its_queues_to_the_keys_it_was_given(bus: RabbitBus) -> None:
    bus.subscribe_fanout(NUDGE_KEYS, Inbox())
    bindings = bus.bindings()
    for queue in WORK_QUEUES:
        assert bindings.pop(f"heimdall.training.work.{queue}") == (work_key(queue),)
    ((name, keys),) = bindings.items()
    assert name.startswith("test.") and keys == NUDGE_KEYS


async def test_publish_before_start_raises(bus: RabbitBus) -> None:
    with pytest.raises(ConnectionError):
        await bus.publish(envelope(1, "Submitted"))


def test_the_committed_asyncapi_document_matches_the_bus() -> None:
    """On drift: `make asyncapi` (`python -m services.asyncapi > docs/asyncapi.json`)."""
    assert json.loads(DOCS.read_text()) == json.loads(asyncapi_json())
