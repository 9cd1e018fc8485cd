"""RabbitBus on a real RabbitMQ; each test owns a uuid-named exchange and work queue."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from shared.bus import ALL_KEYS, NUDGE_KEYS, ROUTING_KEYS, WORK_KEYS, Envelope
from shared.rabbit import RabbitBus

pytestmark = pytest.mark.rabbit
URL = os.environ.get("HEIMDALL_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
BusFactory = Callable[..., RabbitBus]


def envelope(position: int, kind: str = "Submitted") -> Envelope:
    return Envelope(
        position=position, job_id=str(uuid.uuid4()), version=1, kind=kind,
        routing_key=ROUTING_KEYS[kind], timestamp=datetime.now(UTC), actor="test", data={},
    )


def kinds_for(keys: Iterable[str]) -> list[str]:
    return [kind for kind, key in ROUTING_KEYS.items() if key in keys]


@dataclass
class Inbox:
    """Collects what a handler receives; `wait` until enough arrived."""

    received: list[Envelope] = field(default_factory=list)
    delay: float = 0.0

    async def __call__(self, envelope: Envelope) -> None:
        await asyncio.sleep(self.delay)
        self.received.append(envelope)

    async def wait(self, count: int, seconds: float = 10.0) -> list[int]:
        deadline = time.monotonic() + seconds
        while len(self.received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return [e.position for e in self.received]


@dataclass
class Names:
    exchange: str
    work: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    try:
        connection = await aio_pika.connect(URL, timeout=3)
    except Exception as error:
        pytest.skip(f"RabbitMQ not reachable at {URL}: {error}")
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def names(amqp: aio_pika.abc.AbstractChannel) -> AsyncIterator[Names]:
    names = Names(exchange=f"test.{uuid.uuid4().hex}", work=f"test.{uuid.uuid4().hex}.work")
    yield names
    for queue in (names.work, f"{names.work}.dead"):
        await amqp.queue_delete(queue)
    await amqp.exchange_delete(names.exchange)


@pytest.fixture
async def make_bus(names: Names) -> AsyncIterator[BusFactory]:
    buses: list[RabbitBus] = []

    def make(url: str = URL, **options: Any) -> RabbitBus:
        options = {"retry_seconds": 0.01, "publish_seconds": 2.0, "reconnect_seconds": 0.2}
        bus = RabbitBus(url, names.exchange, names.work, **(defaults | options))
        buses.append(bus)
        return bus

    defaults = {"retry_seconds": 0.01, "publish_seconds": 2.0, "reconnect_seconds": 0.2}
    yield make
    for bus in buses:
        with contextlib.suppress(Exception):
            await bus.stop()
