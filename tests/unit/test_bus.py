"""Topic matching, the routing table and the in-process bus's delivery rules."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from shared.application import StoredJobEvent
from shared.bus import (
    ALL_KEYS,
    NUDGE_KEYS,
    ROUTING_KEYS,
    WORK_KEYS,
    WORK_QUEUES,
    WORK_QUEUES_OF_TRAINER,
    Envelope,
    InProcessBus,
    WorkDepth,
    matches,
    routing_key,
    websocket_event,
)
from shared.domainmodel import TrainingJob


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("training.submitted", "training.submitted", True),
        ("training.submitted", "training.started", False),
        ("training.*", "training.progress", True),
        ("training.*", "training", False),
        ("training.*", "training.a.b", False),
        ("*.progress", "training.progress", True),
        ("*", "training.progress", False),
        ("training.#", "training", True),
        ("training.#", "training.progress", True),
        ("training.#", "training.a.b.c", True),
        ("training.#", "trainingx.progress", False),
        ("#", "anything.at.all", True),
        ("#", "", True),
        ("#.progress", "training.progress", True),
        ("#.progress", "progress", True),
        ("#.progress", "training.progress.x", False),
        ("training.#.done", "training.a.b.done", True),
        ("training.#.done", "training.done", True),
        ("training.#.done", "training.a.b", False),
        ("*.*", "training.step", True),
        ("*.*", "training", False),
    ],
)
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert matches(pattern, key) is expected


def test_every_event_kind_has_a_routing_key_on_the_exchange() -> None:
    kinds = [e.__name__ for e in vars(TrainingJob).values() if isinstance(e, type)]
    event_kinds = {k for k in kinds if k in ROUTING_KEYS}
    assert len(event_kinds) == len(ROUTING_KEYS) == 16
    assert all(matches(ALL_KEYS[0], key) for key in ROUTING_KEYS.values())
    assert set(WORK_KEYS) | set(NUDGE_KEYS) <= set(ROUTING_KEYS.values())
    assert routing_key("EpochCompleted") == "training.progress"
    assert websocket_event("training.progress") == "training_progress"
    assert websocket_event("training.worker_lost") == "training_worker_lost"


def test_envelope_of_a_stored_event() -> None:
    job_id = uuid.uuid4()
    stored = StoredJobEvent(
        position=7,
        job_id=job_id,
        version=3,
        kind="Paused",
        timestamp=datetime.now(UTC),
        actor="t1",
        data={"epoch": 2},
        status="paused",
    )
    envelope = Envelope.of(stored)
    assert (envelope.position, envelope.job_id, envelope.routing_key) == (
        7,
        str(job_id),
        "training.paused",
    )
    assert Envelope.model_validate_json(envelope.model_dump_json()) == envelope


def envelope(position: int, kind: str) -> Envelope:
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


class Inbox:
    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def __call__(self, message: Envelope) -> None:
        self.received.append(message)

    @property
    def positions(self) -> list[int]:
        return [e.position for e in self.received]


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def settle(bus: InProcessBus) -> None:
    """Let every delivery task that publish started run to its end."""
    for _ in range(5):
        await asyncio.sleep(0)
    await until(lambda: not bus._tasks)


def work(position: int, queue: str = "any") -> Envelope:
    return Envelope.work(str(uuid.uuid4()), queue, position)


async def test_work_goes_to_exactly_one_subscriber_round_robin() -> None:
    bus, inboxes = InProcessBus(), [Inbox(), Inbox(), Inbox()]
    for inbox in inboxes:
        bus.subscribe_work(inbox)
    await bus.start()
    for position in range(1, 10):
        await bus.publish(work(position, WORK_QUEUES[position % len(WORK_QUEUES)]))
        await settle(bus)
    assert [inbox.positions for inbox in inboxes] == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]
    assert (await bus.work_depths()) == {q: WorkDepth(0, 3) for q in WORK_QUEUES}
    await bus.stop()


async def test_event_keys_never_reach_work_subscribers_nor_work_the_fanouts() -> None:
    bus, worker, everything = InProcessBus(), Inbox(), Inbox()
    bus.subscribe_work(worker)
    bus.subscribe_fanout(["#"], everything)
    for position, kind in enumerate(ROUTING_KEYS, start=1):
        await bus.publish(envelope(position, kind))
    await bus.publish(work(99))
    await settle(bus)
    assert worker.positions == [99]
    assert sorted(everything.positions) == list(range(1, len(ROUTING_KEYS) + 1))


async def test_a_subscriber_gets_no_work_while_its_last_run_goes_on() -> None:
    bus, release = InProcessBus(), asyncio.Event()
    claimed: list[int] = []

    async def take(message: Envelope) -> Awaitable[None]:
        claimed.append(message.position)
        return until_released(release)

    bus.subscribe_work(take)
    for position in (1, 2, 3):
        await bus.publish(work(position))
    await settle_briefly()
    assert claimed == [1]
    assert (await bus.work_depths())["any"] == WorkDepth(2, 1)
    release.set()
    await until(lambda: claimed == [1, 2, 3])
    await bus.stop()


async def test_work_goes_only_to_the_kind_of_trainer_that_can_run_it() -> None:
    bus, cpu, gpu = InProcessBus(), Inbox(), Inbox()
    bus.subscribe_work(cpu, WORK_QUEUES_OF_TRAINER["cpu"])
    await bus.publish(work(1, "gpu"))
    await bus.publish(work(2, "cpu"))
    await bus.publish(work(3, "any"))
    await settle(bus)
    assert cpu.positions == [2, 3]
    assert (await bus.work_depths())["gpu"] == WorkDepth(1, 0)  # waits, and says so
    bus.subscribe_work(gpu, WORK_QUEUES_OF_TRAINER["gpu"])
    await bus.publish(work(4, "cpu"))
    await settle(bus)
    assert gpu.positions == [1] and cpu.positions == [2, 3, 4]


async def test_a_failing_claim_puts_the_message_back_for_later() -> None:
    bus = InProcessBus(retry_seconds=0.01)
    calls: list[int] = []

    async def flaky(message: Envelope) -> None:
        calls.append(message.position)
        if len(calls) < 3:
            raise ConnectionError("store down")

    bus.subscribe_work(flaky)
    await bus.publish(work(5))
    await until(lambda: len(calls) == 3)
    await settle(bus)
    assert calls == [5, 5, 5]
    assert (await bus.work_depths())["any"].ready == 0


async def test_a_stopped_subscriber_takes_no_more_work() -> None:
    bus, inbox = InProcessBus(), Inbox()
    bus.subscribe_work(inbox)
    await bus.stop_work()
    await bus.publish(work(1))
    await settle(bus)
    assert inbox.positions == []
    assert (await bus.work_depths())["any"] == WorkDepth(1, 0)


async def until_released(release: asyncio.Event) -> None:
    await release.wait()


async def settle_briefly() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_fanout_reaches_every_matching_subscriber_and_no_other() -> None:
    bus = InProcessBus()
    everything, nudges, progress, nothing = Inbox(), Inbox(), Inbox(), Inbox()
    bus.subscribe_fanout(ALL_KEYS, everything)
    bus.subscribe_fanout(NUDGE_KEYS, nudges)
    bus.subscribe_fanout(["*.progress", "training.completed"], progress)
    bus.subscribe_fanout(["other.#"], nothing)
    sent = ["Submitted", "PauseRequested", "EpochCompleted", "CancelRequested", "Completed"]
    for position, kind in enumerate(sent, start=1):
        await bus.publish(envelope(position, kind))
    await settle(bus)
    assert sorted(everything.positions) == [1, 2, 3, 4, 5]
    assert sorted(nudges.positions) == [2, 4]
    assert sorted(progress.positions) == [3, 5]
    assert nothing.positions == []


async def test_work_without_subscribers_is_dropped_quietly() -> None:
    bus, watcher = InProcessBus(), Inbox()
    bus.subscribe_fanout(["training.submitted"], watcher)
    await bus.publish(envelope(1, "Submitted"))
    await settle(bus)
    assert watcher.positions == [1]
    assert await bus.healthy()


async def test_a_failing_handler_does_not_stop_the_others() -> None:
    bus, survivor = InProcessBus(), Inbox()

    async def broken(_: Envelope) -> None:
        raise RuntimeError("handler bug")

    bus.subscribe_fanout(ALL_KEYS, broken)
    bus.subscribe_fanout(ALL_KEYS, survivor)
    await bus.publish(envelope(1, "Started"))
    await bus.publish(envelope(2, "Started"))
    await settle(bus)
    assert sorted(survivor.positions) == [1, 2]


async def test_stop_cancels_deliveries_in_flight() -> None:
    bus, gate = InProcessBus(), asyncio.Event()
    finished: list[int] = []

    async def slow(message: Envelope) -> None:
        await gate.wait()
        finished.append(message.position)

    bus.subscribe_fanout(ALL_KEYS, slow)
    await bus.publish(envelope(1, "Started"))
    await asyncio.sleep(0)
    assert len(bus._tasks) == 1
    await bus.stop()
    gate.set()
    await until(lambda: not bus._tasks)
    assert finished == []
