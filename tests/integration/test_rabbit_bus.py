"""RabbitBus on a real RabbitMQ; each test owns a uuid-named exchange and work queue.

These tests need RabbitMQ (as `make test` says): without it they fail, never skip."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from shared.bus import (
    ALL_KEYS,
    NUDGE_KEYS,
    RESUBSCRIBED_KEY,
    ROUTING_KEYS,
    WORK_QUEUES,
    WORK_QUEUES_OF_TRAINER,
    Envelope,
    WorkDepth,
)
from shared.rabbit import START_WAIT_SECONDS, RabbitBus
from tests.faults import Proxy
from tests.integration.conftest import RABBIT_URL

pytestmark = pytest.mark.rabbit

BusFactory = Callable[..., RabbitBus]
FAST = {"retry_seconds": 0.01, "publish_seconds": 2.0, "reconnect_seconds": 0.2}
# Timed assertions check the bus's own latency targets (its docstring: publish raises within
# `publish_seconds`, health says False within a second), with this much room for loaded,
# shared CI cores: missing a target by more is a regression, not noise.
SLACK_SECONDS = 2.0


def envelope(position: int, kind: str = "Submitted") -> Envelope:
    return Envelope(
        position=position,
        job_id=str(uuid.uuid4()),
        version=1,
        kind=kind,
        routing_key=ROUTING_KEYS[kind],
        timestamp=datetime.now(UTC),
        actor="test",
        data={},
        status="queued",
    )


def work(position: int, queue: str = "any") -> Envelope:
    return Envelope.work(str(uuid.uuid4()), queue, position)


@dataclass
class Inbox:
    """Collects what a handler receives; `wait` until enough messages arrived."""

    received: list[Envelope] = field(default_factory=list)
    delay: float = 0.0

    async def __call__(self, envelope: Envelope) -> None:
        await asyncio.sleep(self.delay)
        self.received.append(envelope)

    async def wait(self, count: int, seconds: float = 10.0) -> list[int]:
        await until(lambda: len(self.positions) >= count, seconds)
        return self.positions

    async def told(self, times: int = 1, seconds: float = 30.0) -> bool:
        """Until the bus said `times` times that this subscriber's queue is back."""
        return await until(lambda: self.log.count(TOLD) >= times, seconds)

    @property
    def positions(self) -> list[int]:
        return [e.position for e in self.received if e.routing_key != RESUBSCRIBED_KEY]

    @property
    def log(self) -> list[int | str]:
        """Positions in arrival order, with `TOLD` where the bus said it resubscribed."""
        return [TOLD if e.routing_key == RESUBSCRIBED_KEY else e.position for e in self.received]


TOLD = "resubscribed"


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return condition()


@dataclass
class Names:
    exchange: str
    work: str


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    try:
        connection = await aio_pika.connect(RABBIT_URL, timeout=3)
    except Exception as error:
        pytest.fail(f"these tests need RabbitMQ, not reachable at {RABBIT_URL}: {error!r}")
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def names(amqp: aio_pika.abc.AbstractChannel) -> AsyncIterator[Names]:
    names = Names(exchange=f"test.{uuid.uuid4().hex}", work=f"test.{uuid.uuid4().hex}.work")
    yield names
    for queue in (*(f"{names.work}.{q}" for q in WORK_QUEUES), f"{names.work}.dead"):
        await amqp.queue_delete(queue)
    await amqp.exchange_delete(names.exchange)


@pytest.fixture
async def make_bus(names: Names) -> AsyncIterator[BusFactory]:
    buses: list[RabbitBus] = []

    def make(url: str = RABBIT_URL, **options: Any) -> RabbitBus:
        bus = RabbitBus(url, names.exchange, names.work, **(FAST | options))
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        with contextlib.suppress(Exception):
            await bus.stop()


def took(started: float) -> float:
    return time.monotonic() - started


async def eventually(probe: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await probe():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_envelopes_arrive_in_order_with_the_position_as_message_id(
    make_bus: BusFactory, names: Names, amqp: aio_pika.abc.AbstractChannel
) -> None:
    bus = make_bus()
    await bus.start()
    tap = await amqp.declare_queue(exclusive=True)
    await tap.bind(names.exchange, "training.#")
    sent = [envelope(3 * n, kind) for n, kind in enumerate([*ROUTING_KEYS] * 2, start=1)]
    for item in sent:
        await bus.publish(item)
    got = [await tap.get(timeout=5) for _ in sent]
    assert [m.message_id for m in got] == [str(e.position) for e in sent]
    assert [Envelope.model_validate_json(m.body) for m in got] == sent
    assert [m.routing_key for m in got] == [e.routing_key for e in sent]
    assert {m.delivery_mode for m in got} == {aio_pika.DeliveryMode.PERSISTENT}


async def test_work_goes_to_exactly_one_of_two_competing_trainers(
    make_bus: BusFactory, names: Names, amqp: aio_pika.abc.AbstractChannel
) -> None:
    first, second = Inbox(delay=0.01), Inbox(delay=0.01)
    trainers = [make_bus(), make_bus()]
    for bus, inbox in zip(trainers, (first, second), strict=True):
        bus.subscribe_work(inbox)
        await bus.start()
    publisher = make_bus()
    await publisher.start()
    for position in range(1, 31):
        await publisher.publish(work(position))
    assert await until(lambda: len(first.received) + len(second.received) >= 30)
    for bus in trainers:  # an unacked delivery would go back to the queue now
        await bus.stop()
    queue = await amqp.declare_queue(f"{names.work}.any", passive=True)
    assert queue.declaration_result.message_count == 0
    positions = first.positions + second.positions
    assert sorted(positions) == list(range(1, 31))
    assert first.received and second.received


async def test_fanout_reaches_every_subscriber_by_its_keys(make_bus: BusFactory) -> None:
    watchers, nudged = [Inbox(), Inbox()], Inbox()
    buses = [make_bus() for _ in range(3)]
    buses[0].subscribe_fanout(ALL_KEYS, watchers[0])
    buses[1].subscribe_fanout(ALL_KEYS, watchers[1])
    buses[2].subscribe_fanout(NUDGE_KEYS, nudged)
    for bus in buses:
        await bus.start()
    sent = [envelope(p, kind) for p, kind in enumerate(ROUTING_KEYS, start=1)]
    for item in sent:
        await buses[0].publish(item)
    for watcher in watchers:
        assert await watcher.wait(len(sent)) == [e.position for e in sent]
    nudges = [e.position for e in sent if e.routing_key in NUDGE_KEYS]
    assert await nudged.wait(len(nudges)) == nudges
    assert TOLD not in [*watchers[0].log, *nudged.log]  # connected in `start`: nothing missed


async def test_an_event_nobody_listens_to_does_not_raise(make_bus: BusFactory) -> None:
    bus = make_bus()
    await bus.start()
    await bus.publish(envelope(1, "Archived"))
    await bus.publish(envelope(2, "EpochCompleted"))


async def test_a_deleted_work_queue_is_declared_again_and_nothing_waits_behind_it(
    make_bus: BusFactory, names: Names, amqp: aio_pika.abc.AbstractChannel
) -> None:
    """No trainer of the gpu kind runs to declare its queue again: the publisher and the
    sweep's depth query must, or every later event would queue behind this one."""
    bus = make_bus()
    await bus.start()
    await amqp.queue_delete(f"{names.work}.gpu")
    await bus.publish(work(1, "gpu"))
    await bus.publish(envelope(2, "Submitted"))  # the event itself may have no listener
    queue = await amqp.declare_queue(f"{names.work}.gpu", passive=True)
    assert queue.declaration_result.message_count == 1
    await amqp.queue_delete(f"{names.work}.cpu")
    assert (await bus.work_depths())["cpu"] == WorkDepth(0, 0)
    assert (await bus.work_depths())["gpu"].ready == 1


async def test_an_unreachable_broker_is_waited_for_in_the_background(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    rabbit_proxy.cut(stay_down=True)
    bus = make_bus(rabbit_proxy.url)
    started = time.monotonic()
    await bus.start()  # returns: the service runs on and the bus keeps trying
    assert took(started) < START_WAIT_SECONDS + SLACK_SECONDS
    began = time.monotonic()
    with pytest.raises(ConnectionError):
        await bus.publish(envelope(1))
    assert took(began) < SLACK_SECONDS  # target: at once
    assert await bus.healthy() is False
    rabbit_proxy.open()
    assert await eventually(bus.healthy, 30), "the bus never connected"
    await bus.publish(envelope(1))


async def test_work_waits_in_the_durable_queue_for_a_trainer(
    make_bus: BusFactory, names: Names, amqp: aio_pika.abc.AbstractChannel
) -> None:
    projector = make_bus()
    await projector.start()
    await projector.publish(work(7))
    await projector.stop()
    queue = await amqp.declare_queue(f"{names.work}.any", passive=True)
    assert queue.declaration_result.message_count == 1
    inbox = Inbox()
    trainer = make_bus()
    trainer.subscribe_work(inbox)
    await trainer.start()
    assert await inbox.wait(1) == [7]


async def test_a_poison_work_message_is_dead_lettered_after_the_delivery_limit(
    make_bus: BusFactory, names: Names, amqp: aio_pika.abc.AbstractChannel
) -> None:
    calls: list[int] = []

    async def fail(envelope: Envelope) -> None:
        calls.append(envelope.position)
        raise RuntimeError("poison")

    trainer = make_bus(delivery_limit=2)
    trainer.subscribe_work(fail)
    await trainer.start()
    await trainer.publish(work(5))

    async def dead_lettered() -> bool:
        dead = await amqp.declare_queue(f"{names.work}.dead", passive=True)
        return dead.declaration_result.message_count == 1

    assert await eventually(dead_lettered, 10)
    assert calls == [5, 5, 5]


work_message = work  # where a test's own inbox is named `work`


async def test_work_goes_only_to_a_trainer_of_the_kind_it_needs(make_bus: BusFactory) -> None:
    cpu = Inbox()
    trainer, projector = make_bus(), make_bus()
    trainer.subscribe_work(cpu, WORK_QUEUES_OF_TRAINER["cpu"])
    for bus in (trainer, projector):
        await bus.start()
    for position, queue in enumerate(("gpu", "cpu", "any"), start=1):
        await projector.publish(work(position, queue))
    assert sorted(await cpu.wait(2)) == [2, 3]
    depths = await projector.work_depths()
    assert depths["gpu"] == WorkDepth(1, 0)  # it waits, and the broker says so
    assert depths["cpu"].consumers == depths["any"].consumers == 1


async def test_a_busy_trainer_holds_no_other_work_while_its_run_goes_on(
    make_bus: BusFactory,
) -> None:
    release = asyncio.Event()
    claimed: list[int] = []

    async def claim(envelope: Envelope) -> Awaitable[None]:
        claimed.append(envelope.position)
        return until_released(release)

    busy, projector = make_bus(), make_bus()
    busy.subscribe_work(claim, WORK_QUEUES_OF_TRAINER["gpu"])  # two queues, one gate
    for bus in (busy, projector):
        await bus.start()
    await projector.publish(work(1, "gpu"))
    assert await until(lambda: claimed == [1])
    await projector.publish(work(2, "any"))
    await projector.publish(work(3, "gpu"))
    assert await eventually(lambda: ready(projector, "any", 1))
    assert await eventually(lambda: ready(projector, "gpu", 1))
    free = Inbox()
    other = make_bus()
    other.subscribe_work(free, WORK_QUEUES_OF_TRAINER["gpu"])
    await other.start()
    assert sorted(await free.wait(2)) == [2, 3]  # taken by the free one, meanwhile
    assert claimed == [1]
    release.set()

    await projector.publish(work(4, "gpu"))
    assert await until(lambda: 4 in claimed or 4 in free.positions)
    assert await eventually(lambda: consumers(projector, "gpu", 2))  # both consume again


async def test_a_trainer_with_work_in_both_its_queues_takes_the_oldest_and_loses_none(
    make_bus: BusFactory, names: Names, amqp: aio_pika.abc.AbstractChannel
) -> None:
    """Both of its queues deliver when a run ends; it must run the older job and give
    the other back without a redelivery, or a backlog of one kind starves the other and
    the delivery limit dead-letters the starved job."""
    release = asyncio.Event()
    claimed: list[int] = []

    async def claim(envelope: Envelope) -> Awaitable[None]:
        claimed.append(envelope.position)
        return until_released(release) if envelope.position == 0 else until_released(GO)

    busy, projector = make_bus(delivery_limit=2), make_bus(delivery_limit=2)
    busy.subscribe_work(claim, WORK_QUEUES_OF_TRAINER["cpu"])
    for bus in (busy, projector):
        await bus.start()
    await projector.publish(work(0, "cpu"))
    assert await until(lambda: claimed == [0])
    await projector.publish(work(1, "any"))  # older than every cpu job below
    for position in range(2, 7):
        await projector.publish(work(position, "cpu"))
    release.set()
    assert await until(lambda: len(claimed) == 7, 30), claimed
    assert claimed[:2] == [0, 1], claimed
    assert sorted(claimed) == list(range(7))
    dead = await amqp.declare_queue(f"{names.work}.dead", passive=True)
    assert dead.declaration_result.message_count == 0
    depths = await projector.work_depths()
    assert depths["cpu"].ready == depths["any"].ready == 0


GO = asyncio.Event()
GO.set()


async def test_a_reconnect_during_a_run_brings_no_work_to_the_busy_trainer(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    release = asyncio.Event()
    claimed: list[int] = []

    async def claim(envelope: Envelope) -> Awaitable[None]:
        claimed.append(envelope.position)
        return until_released(release)

    busy, projector = make_bus(rabbit_proxy.url), make_bus()
    busy.subscribe_work(claim)
    for bus in (busy, projector):
        await bus.start()
    await projector.publish(work(1))
    assert await until(lambda: claimed == [1])
    rabbit_proxy.cut(stay_down=True)  # its connection drops mid-run
    assert await eventually(lambda: down(busy))
    rabbit_proxy.open()  # and comes back: the robust channel restores what it knows
    assert await eventually(busy.healthy, 30)
    await projector.publish(work(2))
    # Not restored, so not sent (job 1's message may be back too, if the cut beat its ack).
    assert await eventually(lambda: ready_at_least(projector, "any", 1))
    assert claimed == [1]
    release.set()
    assert await until(lambda: 2 in claimed, 15)  # consuming again after the run


async def test_a_message_held_by_a_trainer_that_died_reaches_another(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    stuck: list[int] = []

    async def hang(envelope: Envelope) -> None:
        stuck.append(envelope.position)
        await asyncio.Event().wait()  # dies mid-claim: never acks

    dying, projector = make_bus(rabbit_proxy.url), make_bus()
    dying.subscribe_work(hang)
    for bus in (dying, projector):
        await bus.start()
    await projector.publish(work(9))
    assert await until(lambda: stuck == [9])
    rabbit_proxy.cut(stay_down=True)  # its connection is gone, as with kill -9
    survivor = Inbox()
    other = make_bus()
    other.subscribe_work(survivor)
    await other.start()
    assert await survivor.wait(1, seconds=30) == [9]


async def until_released(release: asyncio.Event) -> None:
    await release.wait()


async def ready(bus: RabbitBus, queue: str, count: int) -> bool:
    return (await bus.work_depths())[queue].ready == count


async def ready_at_least(bus: RabbitBus, queue: str, count: int) -> bool:
    return (await bus.work_depths())[queue].ready >= count


async def consumers(bus: RabbitBus, queue: str, count: int) -> bool:
    return (await bus.work_depths())[queue].consumers == count


async def test_health_follows_the_connection(make_bus: BusFactory) -> None:
    bus = make_bus()
    await bus.start()
    assert await bus.healthy() is True
    await bus.stop()
    started = time.monotonic()
    assert await bus.healthy() is False
    assert took(started) < 1 + SLACK_SECONDS


async def test_consumers_and_bindings_come_back_after_the_connection_drops(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    work, nudges = Inbox(), Inbox()
    bus = make_bus(rabbit_proxy.url)
    bus.subscribe_work(work)
    bus.subscribe_fanout(NUDGE_KEYS, nudges)
    await bus.start()
    await bus.publish(work_message(1))
    await bus.publish(envelope(2, "PauseRequested"))
    assert await work.wait(1) == [1]
    assert await nudges.wait(1) == [2]
    rabbit_proxy.cut()
    assert await nudges.told(), "the bus never said the nudge queue is back"
    await bus.publish(work_message(3))
    await bus.publish(envelope(4, "CancelRequested"))
    assert await until(lambda: 3 in work.positions and 4 in nudges.positions)
    assert nudges.log == [2, TOLD, 4]


async def test_publish_during_an_outage_raises_quickly_then_recovers(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    watch = Inbox()
    bus = make_bus(rabbit_proxy.url)
    bus.subscribe_fanout(ALL_KEYS, watch)
    await bus.start()
    rabbit_proxy.cut(stay_down=True)
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - the projector retries on any error
        await bus.publish(envelope(1))
    assert took(started) < FAST["publish_seconds"] + SLACK_SECONDS
    assert await bus.healthy() is False
    rabbit_proxy.open()
    assert await watch.told()
    await bus.publish(envelope(2))
    assert await watch.wait(1) == [2]
    assert watch.log == [TOLD, 2]


async def test_a_subscriber_is_told_when_its_queue_is_back_after_it_missed_messages(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    """The projector's link stays up while the api's drops: what it publishes meanwhile
    is confirmed and never reaches the api's queue; the api hears that it may have
    missed some before anything published after."""
    watch = Inbox()
    api, projector = make_bus(rabbit_proxy.url), make_bus()
    api.subscribe_fanout(ALL_KEYS, watch)
    for bus in (api, projector):
        await bus.start()
    await projector.publish(envelope(1))
    assert await watch.wait(1) == [1]
    rabbit_proxy.cut(stay_down=True)
    assert await eventually(lambda: down(api))
    await projector.publish(envelope(2, "PauseRequested"))  # confirmed; the queue is gone
    await projector.publish(envelope(3, "Archived"))
    rabbit_proxy.open()
    assert await watch.told()
    await projector.publish(envelope(4, "CancelRequested"))
    assert await watch.wait(2) == [1, 4]
    assert watch.log == [1, TOLD, 4]


async def test_a_first_connection_made_after_start_returned_is_told_too(
    make_bus: BusFactory, rabbit_proxy: Proxy
) -> None:
    rabbit_proxy.cut(stay_down=True)
    watch = Inbox()
    api = make_bus(rabbit_proxy.url)
    api.subscribe_fanout(ALL_KEYS, watch)
    await api.start()  # gives up waiting; the service runs on, and may miss messages
    rabbit_proxy.open()
    assert await watch.told()
    assert watch.log == [TOLD]


async def down(bus: RabbitBus) -> bool:
    return not await bus.healthy()
