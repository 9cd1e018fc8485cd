"""The WebSocket hub on the in-process bus: routing, bounded queues, messages, telemetry,
and the gaps a lossy bus leaves, which each session fills from the store."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

import pytest
from fastapi import WebSocket

from services import runtime
from services.api.deps import ApiContext
from services.api.hub import Gap, Hub, Outgoing, Subscription, encode, event_message
from services.api.routes.ws import BadQueryError, parse_after
from services.api.session import LiveSession, reply
from services.trainer.control import StartInfo, StepInfo
from services.trainer.reporting import StepTelemetry
from shared.bus import ALL_KEYS, NUDGE_KEYS, Envelope, InProcessBus, routing_key
from shared.settings import Settings
from tests.unit.test_bus import settle, until


def stored(position: int, kind: str, job_id: str, **data: Any) -> Envelope:
    return Envelope(
        position=position,
        job_id=job_id,
        version=position,
        kind=kind,
        routing_key=routing_key(kind),
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        actor="tester",
        data=data,
        status="queued",
    )


def drain(subscription: Subscription) -> list[dict[str, Any]]:
    items = []
    while not subscription.queue.empty():
        item = subscription.queue.get_nowait()
        items.append({"event": "gap"} if isinstance(item, Gap) else json.loads(item.text))
    return items


def seen(subscription: Subscription) -> list[int | str]:
    """Positions in queue order, with "gap" where the hub may have missed some."""
    return [m.get("position", m["event"]) for m in drain(subscription)]


async def test_each_event_reaches_its_jobs_watchers_and_the_all_jobs_watchers() -> None:
    bus, hub = InProcessBus(), Hub(queue_size=10)
    bus.subscribe_fanout(ALL_KEYS, hub.relay)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    on_a, on_b, on_all = hub.subscribe(a), hub.subscribe(b), hub.subscribe(None)
    await bus.start()
    await bus.publish(stored(1, "Submitted", a))
    await bus.publish(stored(2, "EpochCompleted", b, epoch=1))
    await bus.publish(stored(3, "Started", a))
    await settle(bus)
    assert [m["position"] for m in drain(on_a)] == [1, 3]
    assert [(m["event"], m["position"]) for m in drain(on_b)] == [("training_progress", 2)]
    assert [m["position"] for m in drain(on_all)] == [1, 2, 3]
    assert hub.clients == 3
    for subscription in (on_a, on_b, on_all):
        hub.unsubscribe(subscription)
    assert hub.clients == 0
    await bus.stop()


async def test_a_full_queue_marks_the_client_behind_and_takes_no_more() -> None:
    hub, job = Hub(queue_size=2), str(uuid.uuid4())
    slow, quick = hub.subscribe(job), hub.subscribe(job)
    for position in (1, 2, 3):
        await hub.relay(stored(position, "CheckpointSaved", job))
        drain(quick)
    assert slow.overflowed.is_set() and not quick.overflowed.is_set()
    assert slow.queue.qsize() == 2
    await hub.relay(stored(4, "CheckpointSaved", job))
    assert [m["position"] for m in drain(slow)] == [1, 2]


async def test_a_jump_in_positions_puts_a_gap_ahead_of_it_for_every_watcher() -> None:
    hub, a, b = Hub(), str(uuid.uuid4()), str(uuid.uuid4())
    on_a, on_b, on_all = hub.subscribe(a), hub.subscribe(b), hub.subscribe(None)
    await hub.relay(stored(1, "Submitted", a))
    await hub.relay(stored(2, "Submitted", b))
    await hub.relay(stored(5, "PauseRequested", a))  # 3 and 4: missed, or never stored
    await hub.relay(stored(6, "PauseRequested", b))
    await hub.relay(stored(5, "PauseRequested", a))  # a duplicate is no jump
    await hub.relay(Envelope.step(a, "w1", {"step": 1}))  # telemetry has no position
    assert seen(on_all) == [1, 2, "gap", 5, 6, 5, "training_step"]
    assert seen(on_a) == [1, "gap", 5, 5, "training_step"]
    assert seen(on_b) == [2, "gap", 6]
    assert hub.position == 6


async def test_the_bus_saying_it_resubscribed_puts_a_gap_in_every_queue() -> None:
    hub, job = Hub(), str(uuid.uuid4())
    watcher, everything = hub.subscribe(job), hub.subscribe(None)
    await hub.relay(stored(1, "Submitted", job))
    await hub.relay(Envelope.resubscribed())
    await hub.relay(stored(2, "PauseRequested", job))
    assert (seen(watcher), seen(everything)) == ([1, "gap", 2], [1, "gap", 2])


async def test_telemetry_reaches_fanouts_only_and_carries_no_position() -> None:
    bus, hub, job = InProcessBus(), Hub(), str(uuid.uuid4())
    work: list[Envelope] = []
    nudges: list[Envelope] = []

    async def on_work(envelope: Envelope) -> None:
        work.append(envelope)

    async def on_nudge(envelope: Envelope) -> None:
        nudges.append(envelope)

    bus.subscribe_work(on_work)
    bus.subscribe_fanout(NUDGE_KEYS, on_nudge)
    bus.subscribe_fanout(ALL_KEYS, hub.relay)
    watcher = hub.subscribe(job)
    await bus.publish_telemetry(Envelope.step(job, "w1", {"epoch": 1, "step": 2}))
    await settle(bus)
    assert work == [] and nudges == []
    [message] = drain(watcher)
    assert message["event"] == "training_step" and "position" not in message
    assert message["data"] == {"epoch": 1, "step": 2} and message["job_id"] == job


def test_event_messages_are_strict_json_with_the_contract_fields() -> None:
    job = str(uuid.uuid4())
    envelope = stored(7, "EpochCompleted", job, metrics={"val_loss": float("nan")}, epoch=2)
    message = json.loads(Outgoing.of(envelope).text)
    assert set(message) == {"event", "job_id", "position", "timestamp", "status", "data"}
    assert message["event"] == "training_progress" and message["position"] == 7
    assert message["data"]["metrics"]["val_loss"] is None
    assert message["timestamp"] == "2026-01-02T03:04:05+00:00"
    assert event_message(envelope)["event"] == "training_progress"
    assert json.loads(encode({"x": [float("inf"), 1.5]})) == {"x": [None, 1.5]}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"type": "websocket.receive", "text": '{"event": "ping"}'}, "pong"),
        ({"type": "websocket.receive", "text": "{nope"}, "malformed JSON"),
        ({"type": "websocket.receive", "text": "[1, 2]"}, '"event" field'),
        ({"type": "websocket.receive", "text": '{"event": "subscribe"}'}, "unknown event"),
        ({"type": "websocket.receive", "bytes": b"\x00"}, "not binary"),
    ],
)
def test_client_messages_get_a_pong_or_an_error_naming_the_problem(
    message: dict[str, Any], expected: str
) -> None:
    answer = reply(message)
    if expected == "pong":
        assert answer["event"] == "pong" and "timestamp" in answer
    else:
        assert answer["event"] == "error" and expected in answer["detail"]


def test_after_is_one_non_negative_64_bit_integer() -> None:
    assert parse_after([]) is None
    assert parse_after(["0"]) == 0
    assert parse_after([str(2**63 - 1)]) == 2**63 - 1
    for bad in (["-1"], ["abc"], ["1.5"], [""], [str(2**63)], ["9" * 5000], ["1", "2"], ["\u0661"]):
        with pytest.raises(BadQueryError, match="after: must be an integer"):
            parse_after(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_step_telemetry_is_throttled_and_never_blocks_the_training_thread() -> None:
    bus, hub, job = InProcessBus(), Hub(), str(uuid.uuid4())
    bus.subscribe_fanout(ALL_KEYS, hub.relay)
    watcher, clock = hub.subscribe(job), Clock()
    telemetry = StepTelemetry(bus, asyncio.get_running_loop(), job, "w1", clock=clock)
    clock.now = 99.0  # the attempt starts a second before its first step ends
    telemetry.start(StartInfo("cpu", 80, 20, 0, total_epochs=2, steps_per_epoch=10))

    def train() -> None:  # on a thread, as the trainer runs it
        for step, at in enumerate((0.0, 0.5, 0.99, 1.0, 1.5, 2.0), start=1):
            clock.now = 100.0 + at
            telemetry(StepInfo(1, step, 10, loss=1.0 / step, samples_per_second=8.0))

    await asyncio.to_thread(train)
    await settle(bus)
    await asyncio.sleep(0.05)
    await settle(bus)
    steps = [m["data"] for m in drain(watcher)]
    assert [s["step"] for s in steps] == [1, 4, 6]
    # An ETA from the first step on: steps left x seconds a step since the attempt began.
    assert steps[0]["eta_seconds"] == pytest.approx((20 - 1) * 1.0 / 1, abs=0.1)
    assert steps[1]["eta_seconds"] == pytest.approx((20 - 4) * 2.0 / 4, abs=0.1)
    assert steps[2] | {"loss": None} == {
        "epoch": 1,
        "total_epochs": 2,
        "step": 6,
        "steps_per_epoch": 10,
        "loss": None,
        "samples_per_second": 8.0,
        "eta_seconds": pytest.approx(14 * 3.0 / 6, abs=0.1),
    }


def test_step_telemetry_after_the_loop_closed_is_dropped_quietly() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    telemetry = StepTelemetry(InProcessBus(), loop, str(uuid.uuid4()), "w1")
    telemetry(StepInfo(1, 1, 10, loss=float("nan"), samples_per_second=1.0))


async def test_a_failing_bus_drops_telemetry_without_raising() -> None:
    class DownBus(InProcessBus):
        async def publish_telemetry(self, envelope: Envelope) -> None:
            raise ConnectionError("down")

    telemetry = StepTelemetry(DownBus(), asyncio.get_running_loop(), str(uuid.uuid4()), "w1")
    telemetry(StepInfo(1, 1, 10, loss=0.5, samples_per_second=1.0))
    await asyncio.sleep(0.01)
    assert not telemetry._tasks


class LossyBus(InProcessBus):
    """The in-process bus with a link that drops: while `down`, published messages vanish,
    as they do for an api whose private RabbitMQ queue went with its connection."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def publish(self, envelope: Envelope) -> None:
        if not self.down:
            await super().publish(envelope)

    async def resubscribe(self) -> None:
        """Back, and says so, as RabbitBus does once it made its queues again."""
        self.down = False
        for _, handler in self._fanout:
            await handler(Envelope.resubscribed())


class FakeSocket:
    """What a LiveSession uses of its WebSocket: what it sent, and how it closed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.gone = asyncio.Event()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "websocket.disconnect"}

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code = code

    def positions(self) -> list[int]:
        return [
            m["position"] for m in self.sent if "position" in m and m["event"] != "training_status"
        ]


@dataclass
class Live:
    """The api's live path in-process: store, projector, a lossy bus, the hub, sessions."""

    context: ApiContext
    bus: LossyBus
    hub: Hub = field(default_factory=Hub)
    sessions: list[asyncio.Task[None]] = field(default_factory=list)

    async def watch(self, job_id: str | None) -> FakeSocket:
        socket = FakeSocket()
        target = UUID(job_id) if job_id else None
        session = LiveSession(cast(WebSocket, socket), self.context, self.hub, target, 0)
        self.sessions.append(asyncio.create_task(session.run()))
        await until(lambda: any(m["event"] == "connected" for m in socket.sent))
        return socket

    async def submit(self) -> str:
        accepted = await self.context.commands.submit(
            f"j-{uuid.uuid4().hex[:6]}", "", {}, "t", None
        )
        return str(accepted.job.id)

    async def command(self, verb: str, job_id: str) -> int:
        """pause, resume or cancel; once the projector has also published it."""
        accepted = await getattr(self.context.commands, verb)(UUID(job_id), "t")
        position = int(accepted.position)
        await until(lambda: self.context.reads.positions()["published"] >= position)
        return position

    def stored(self, job_id: str | None) -> list[int]:
        if job_id is None:
            return [e.position for e in self.context.jobs.feed(0, 1000)]
        return [e.position for e in self.context.jobs.history(UUID(job_id))]


@pytest.fixture
async def live(sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Live]:
    bus = LossyBus()
    monkeypatch.setattr(runtime, "build_bus", lambda _: bus)
    context, background = runtime.build_api(sqlite_settings, with_projector=True)
    live = Live(context, bus)
    bus.subscribe_fanout(ALL_KEYS, live.hub.relay)
    stop = asyncio.Event()
    services = [asyncio.create_task(service(stop)) for service in background]
    yield live
    stop.set()
    for session in live.sessions:
        session.cancel()
    await asyncio.gather(*services, *live.sessions, return_exceptions=True)
    await bus.stop()


async def test_a_jump_in_positions_makes_each_session_fill_the_gap_from_the_store(
    live: Live,
) -> None:
    a, b = await live.submit(), await live.submit()
    on_a, on_b, everything = await live.watch(a), await live.watch(b), await live.watch(None)
    await live.command("pause", a)
    live.bus.down = True
    await live.command("pause", b)  # lost on the way to the hub
    await live.command("resume", a)  # lost too
    live.bus.down = False
    await live.command("cancel", b)  # arrives: a jump past the lost ones
    await live.command("cancel", a)
    await until(lambda: on_a.close_code is not None and on_b.close_code is not None)
    await until(lambda: everything.positions()[-1:] == live.stored(None)[-1:])
    assert (on_a.close_code, on_b.close_code) == (1000, 1000)
    assert on_a.positions() == live.stored(a)
    assert on_b.positions() == live.stored(b)
    assert everything.positions() == live.stored(None)


async def test_a_socket_whose_last_events_were_lost_gets_them_when_the_bus_is_back(
    live: Live,
) -> None:
    a, b = await live.submit(), await live.submit()
    on_a, everything = await live.watch(a), await live.watch(None)
    await live.command("pause", a)
    live.bus.down = True
    await live.command("pause", b)
    await live.command("cancel", a)  # the job's end: nothing of it follows to show a jump
    await live.bus.resubscribe()
    await until(lambda: on_a.close_code is not None)
    await until(lambda: everything.positions()[-1:] == live.stored(None)[-1:])
    assert on_a.close_code == 1000
    assert on_a.positions() == live.stored(a)
    assert everything.positions() == live.stored(None)
