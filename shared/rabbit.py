"""The RabbitMQ bus: a durable topic exchange, a quorum work queue, private fan-out queues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelNotFoundEntity, PublishError
from faststream import AckPolicy
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
)
from faststream.rabbit.annotations import RabbitMessage
from faststream.rabbit.publisher import RabbitPublisher

from shared.bus import (
    ACCELERATOR_OF_WORK_QUEUE,
    ROUTING_KEYS,
    TELEMETRY_KEY,
    WORK_QUEUES,
    Bus,
    Envelope,
    Handler,
    WorkDepth,
    WorkHandler,
    is_work,
    work_key,
)
from shared.logs import job_context
from shared.waiting import retrying_until

log = logging.getLogger(__name__)
HEALTH_SECONDS = 1.0
PING_SECONDS = 0.2
# How long `start` waits for the first connection before leaving it to the background.
START_WAIT_SECONDS = 5.0
DEAD_LETTER_MAX = 100_000
# How long a trainer's gate waits, after a delivery, for one on its other queue, so that
# it claims the older of the two rather than whichever came first.
GATHER_SECONDS = 0.05
Consumer = Callable[..., Awaitable[None]]
_PUBLISHED = {
    TELEMETRY_KEY: "Live step telemetry between epochs; never in the store.",
    **{
        work_key(kind): f"One message per runnable job whose config asks for accelerator"
        f" {accelerators}: after each stored event that leaves the job queued (message id ="
        " its position), and again from the projector's sweep when one seems lost."
        for kind, accelerators in ACCELERATOR_OF_WORK_QUEUE.items()
    },
}


def work_queue_names(work_queue: str) -> dict[str, str]:
    """Kind of work (`any`, `cpu`, `gpu`) and `dead` → the name of its queue, from the
    configured `work_queue` prefix."""
    return {**{kind: f"{work_queue}.{kind}" for kind in WORK_QUEUES}, "dead": f"{work_queue}.dead"}


def _uuid() -> str:
    return uuid.uuid4().hex


class RabbitBus(Bus):
    """The bus on RabbitMQ, through FastStream's broker (a robust aio-pika connection).

    Publishing: persistent messages, publisher confirms, `mandatory` with
    `on_return_raises`, message id = store position. Every bus declares the work queue
    and its bindings on start, so a work message always has a home even before any
    trainer ran. Any other event may have no listener at all (`training.archived` while
    no api watches): the broker returns it and it is dropped on purpose, since it is
    derived from the store and anyone who needs it later reads the store. A returned
    work message means the topology was tampered with, so it raises and the projector
    retries it.

    Work queues: one per kind of work (`<work_queue>.any`, `.cpu`, `.gpu`), each bound to
    its `work.<kind>` key; quorum, prefetch 1. A subscriber's messages, over all the
    queues it consumes, are handled one at a time (`_WorkGate`): a claimed message is
    acked only after its consumers are cancelled, so no other work waits on a busy
    trainer, and they consume again when the run ends. A failing claim backs off
    (doubling from `retry_seconds`) and nacks to requeue; past `delivery_limit`
    redeliveries the broker dead-letters the message to `<work_queue>.dead` instead of
    looping on a poison message.

    Fan-out: one exclusive, auto-delete queue per subscriber with a uuid name; a failing
    handler drops the message (fan-out messages are hints, confirmed against the store).
    The queue goes with its connection, and what is published meanwhile never reaches it,
    so each time it is made again after `start` returned (a reconnect, or a first
    connection made late) its handler gets `Envelope.resubscribed()`: whoever must not
    miss an event reads what it missed from the store (the api's hub does).

    Outages: the connection reconnects every `reconnect_seconds` and restores the
    channel, queues, bindings and consumers. Meanwhile `publish` raises within
    `publish_seconds` and `healthy()` says False within a second.
    """

    def __init__(
        self,
        url: str,
        exchange: str = "heimdall.training",
        work_queue: str = "heimdall.training.work",
        *,
        delivery_limit: int = 5,
        retry_seconds: float = 1.0,
        publish_seconds: float = 5.0,
        reconnect_seconds: float = 2.0,
        private_id: Callable[[], str] = _uuid,
    ) -> None:
        self._broker = RabbitBroker(
            url,
            timeout=publish_seconds,
            reconnect_interval=reconnect_seconds,
            default_channel=Channel(
                prefetch_count=1, publisher_confirms=True, on_return_raises=True
            ),
            log_level=logging.DEBUG,
            on_reconnected=[self._resubscribed],
        )
        self._exchange = RabbitExchange(exchange, type=ExchangeType.TOPIC, durable=True)
        names = work_queue_names(work_queue)
        self._dead = RabbitQueue(
            names["dead"],
            durable=True,
            arguments={"x-max-length": DEAD_LETTER_MAX, "x-overflow": "drop-head"},
        )
        self._work = {
            kind: RabbitQueue(
                names[kind],
                queue_type=QueueType.QUORUM,
                routing_key=work_key(kind),
                arguments={
                    "x-delivery-limit": delivery_limit,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self._dead.name,
                },
            )
            for kind in WORK_QUEUES
        }
        self._bindings: list[tuple[RabbitQueue, tuple[str, ...]]] = [
            (queue, (work_key(kind),)) for kind, queue in self._work.items()
        ]
        self._gates: list[_WorkGate] = []
        self._retry_seconds, self._publish_seconds = retry_seconds, publish_seconds
        self._delivery_limit = delivery_limit
        self._private_id = private_id
        self._fanouts: list[Handler] = []
        self._started = self._running = False
        self._stopping = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None
        self._telemetry_channel = Channel(publisher_confirms=False)
        keys = (*ROUTING_KEYS.values(), TELEMETRY_KEY, *map(work_key, WORK_QUEUES))
        self._publishers = {key: self._publisher(key) for key in keys}

    @property
    def broker(self) -> RabbitBroker:
        return self._broker

    def bindings(self) -> dict[str, tuple[str, ...]]:
        """Queue name → the topic patterns it is bound to."""
        return {queue.name: keys for queue, keys in self._bindings}

    def subscribe_work(self, handler: WorkHandler, queues: Sequence[str] = WORK_QUEUES) -> None:
        gate = _WorkGate(handler, self._retry_seconds, self._delivery_limit, self.publish)
        for kind in queues:
            queue = self._work[kind]
            subscriber = self._broker.subscriber(
                queue,
                self._exchange,
                ack_policy=AckPolicy.MANUAL,
                title=f"{queue.name}:consume",
                description=_describe(handler, (work_key(kind),)),
            )
            subscriber(gate.consume)
            gate.subscribers.append(subscriber)
        self._gates.append(gate)

    async def stop_work(self) -> None:
        for gate in self._gates:
            await gate.close()

    def subscribe_fanout(self, keys: Sequence[str], handler: Handler) -> None:
        role = getattr(handler, "__name__", "fanout").strip("_")
        queue = RabbitQueue(
            f"{self._exchange.name}.{role}.{self._private_id()}",
            durable=False,
            exclusive=True,
            auto_delete=True,
            routing_key=keys[0],
        )
        self._bindings.append((queue, tuple(keys)))
        self._fanouts.append(handler)
        self._broker.subscriber(
            queue,
            self._exchange,
            ack_policy=AckPolicy.REJECT_ON_ERROR,
            title=f"{queue.name}:consume",
            description=_describe(handler, keys),
        )(_fanout_consumer(handler))

    async def start(self) -> None:
        """Connect now if RabbitMQ answers; if not, keep trying in the background with
        backoff, so a service started before the broker runs meanwhile: `publish` raises
        and `healthy()` says False until the connection is made."""
        self._stopping, self._running = asyncio.Event(), False
        self._connecting = asyncio.create_task(self._connect_until_done())
        await asyncio.wait({self._connecting}, timeout=START_WAIT_SECONDS)
        self._running = True  # from now on, a subscriber may have missed what came before

    async def _connect_until_done(self) -> None:
        try:
            async for attempt in retrying_until(self._stopping, "connecting to RabbitMQ"):
                with attempt:
                    try:
                        await self._connect()
                    except Exception:
                        await self._broker.stop()  # a clean slate: no half-made connection
                        raise
            if self._running:
                await self._resubscribed()
        except Exception as error:
            log.info("gave up connecting to RabbitMQ: %r", error)

    async def _connect(self) -> None:
        """Connect, declare every queue with all its bindings, then start consuming."""
        await self._broker.connect()
        exchange = await self._broker.declare_exchange(self._exchange)
        await self._broker.declare_queue(self._dead)
        for queue, keys in self._bindings:
            declared = await self._broker.declare_queue(queue)
            for key in keys:
                await declared.bind(exchange, routing_key=key, robust=True)
        await self._broker.start()
        self._started = True

    async def _declare_work_queues(self) -> None:
        """The dead-letter and work queues with their bindings, declared again after someone
        deleted one: on a plain channel, since FastStream's declarer answers from what it
        declared before and aio-pika's robust channel from its own copies."""
        async with self._plain_channel() as channel:
            for queue in (self._dead, *self._work.values()):
                declared = await channel.declare_queue(
                    queue.name, durable=True, arguments=queue.arguments
                )
                if queue is not self._dead:
                    await declared.bind(self._exchange.name, routing_key=queue.routing())

    @contextlib.asynccontextmanager
    async def _plain_channel(self) -> AsyncIterator[AbstractChannel]:
        """A channel of its own for one question: the broker closes a channel whose passive
        declare names a missing queue, and FastStream would hand that closed one out again."""
        connection = self._broker._connection
        if connection is None:
            raise ConnectionError("the bus is not connected")
        async with connection.channel(publisher_confirms=False) as channel:
            yield channel

    async def _resubscribed(self, *_: object) -> None:
        """Tell every fan-out handler its queue is back (after its bindings and consumer)."""
        for handler in self._fanouts:
            try:
                await handler(Envelope.resubscribed())
            except Exception:
                log.exception("a fan-out handler failed on the resubscribed notice")

    async def stop(self) -> None:
        self._started = False
        if self._connecting is not None:
            self._stopping.set()
            await self._connecting
        await self._broker.stop()

    async def publish(self, envelope: Envelope) -> None:
        key = envelope.routing_key
        if not self._started:
            raise ConnectionError("the bus is not started (or its start failed)")
        try:
            await self._publish(envelope)
        except PublishError:
            if not is_work(key):
                log.debug("no queue for %s; dropped position %d", key, envelope.position)
                return
            # A work queue was deleted (no trainer of its kind declares it again): make
            # the topology again, once, rather than hold every later event behind this one.
            log.warning("no work queue for %s: declaring the queues again", key)
            await self._declare_work_queues()
            await self._publish(envelope)

    async def _publish(self, envelope: Envelope) -> None:
        publisher = self._publishers[envelope.routing_key]
        publishing = publisher.publish(envelope, message_id=str(envelope.position))
        await asyncio.wait_for(publishing, self._publish_seconds)

    async def publish_telemetry(self, envelope: Envelope) -> None:
        """On its own channel without confirms, transient, not mandatory: the next replaces it."""
        if not self._started:
            raise ConnectionError("the bus is not started (or its start failed)")
        manager = self._broker.config.channel_manager
        channel = await manager.get_channel(self._telemetry_channel)
        exchange = await channel.get_exchange(self._exchange.name, ensure=False)
        message = Message(
            envelope.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
        )
        publishing = exchange.publish(message, routing_key=envelope.routing_key, mandatory=False)
        await asyncio.wait_for(publishing, self._publish_seconds)

    async def healthy(self) -> bool:
        if not self._started:
            return False
        try:
            return await asyncio.wait_for(self._usable(), HEALTH_SECONDS)
        except Exception:
            return False

    async def work_depths(self) -> dict[str, WorkDepth]:
        """Passive declares on a plain channel of their own: the broker's counts, now (a
        robust channel answers a passive declare of a queue it declared from its copy,
        with the counts of the first answer)."""
        if not self._started:
            raise ConnectionError("the bus is not started (or its start failed)")
        try:
            return await self._depths()
        except ChannelNotFoundEntity:  # a work queue was deleted: declare them again, once
            log.warning("a work queue is missing: declaring the queues again")
            await self._declare_work_queues()
            return await self._depths()

    async def _depths(self) -> dict[str, WorkDepth]:
        depths = {}
        async with self._plain_channel() as channel:
            for kind, queue in self._work.items():
                declared = await channel.declare_queue(queue.name, passive=True)
                result = declared.declaration_result
                depths[kind] = WorkDepth(result.message_count or 0, result.consumer_count or 0)
        return depths

    async def _usable(self) -> bool:
        if not await self._broker.ping(timeout=PING_SECONDS):
            return False
        channel = await self._broker.config.channel_manager.get_channel()
        return not channel.is_closed

    def _publisher(self, key: str) -> RabbitPublisher:
        return self._broker.publisher(
            exchange=self._exchange,
            routing_key=key,
            persist=True,
            timeout=self._publish_seconds,
            schema=Envelope,
            title=f"{key}:publish",
            description=_PUBLISHED.get(key, f"Each stored `{key}` event, in store order."),
        )


def _describe(handler: Callable[..., object], keys: Sequence[str]) -> str:
    doc = (handler.__doc__ or "").strip().splitlines()
    return " ".join([*doc[:1], f"Bound to {', '.join(keys)}."])


def _fanout_consumer(handler: Handler) -> Consumer:
    async def consume(envelope: Envelope) -> None:
        await handler(envelope)

    return consume


class _WorkGate:
    """One work subscriber's consumers, one per queue it takes: one job at a time, the
    oldest first.

    Each delivery is held; one decider at a time waits `GATHER_SECONDS` for a delivery
    on the subscriber's other queue, then claims the held message published first. A
    claim that gives a run cancels every consumer of the gate before the ack frees the
    prefetch slot, so the broker delivers nothing more to this subscriber while it runs.
    A message it holds and does not run (the younger of two, or one that arrived as the
    run began) is given back (`_give_back`): nacked, which keeps its place, unless one
    more delivery would reach `delivery_limit`, after which the broker would dead-letter
    a message that was never at fault; then as a copy. A failing claim is nacked after a
    backoff and counts toward the limit, as a poison message should. The consumers start
    again when the run ends, unless the gate was closed. FastStream 0.7 has no public way
    to pause one subscriber from inside its handler (`stop()` waits for that handler), so
    this cancels and restarts the aio-pika consumer that FastStream started for it.
    """

    def __init__(
        self,
        handler: WorkHandler,
        retry_seconds: float,
        delivery_limit: int,
        republish: Callable[[Envelope], Awaitable[None]],
    ) -> None:
        self.handler, self.retry_seconds, self.republish = handler, retry_seconds, republish
        self.delivery_limit = delivery_limit
        self.subscribers: list[Any] = []
        self.running: asyncio.Task[None] | None = None
        self.closed = False
        self._lock = asyncio.Lock()
        self._held: list[tuple[Envelope, RabbitMessage]] = []
        self._deciding: asyncio.Task[None] | None = None

    async def consume(self, envelope: Envelope, message: RabbitMessage) -> None:
        """Hold the delivery for the decider (acked or given back by it, later)."""
        self._held.append((envelope, message))
        if self._deciding is None or self._deciding.done():
            self._deciding = asyncio.create_task(self._decide())

    async def _decide(self) -> None:
        await asyncio.sleep(GATHER_SECONDS)
        async with self._lock:
            while self._held:
                self._held.sort(key=lambda held: held[0].timestamp)
                envelope, message = self._held.pop(0)
                if self.running is not None or self.closed:
                    await self._pause()  # a consumer that came back meanwhile (a reconnect)
                    with job_context(envelope.job_id):
                        await self._give_back(envelope, message)
                    continue
                await self._claim(envelope, message)

    async def _claim(self, envelope: Envelope, message: RabbitMessage) -> None:
        with job_context(envelope.job_id):  # its log lines, here and in the handler, name it
            await self._claim_job(envelope, message)

    async def _claim_job(self, envelope: Envelope, message: RabbitMessage) -> None:
        try:
            run = await self.handler(envelope)
        except Exception:
            log.exception("claiming job %s failed; it will be delivered again", envelope.job_id)
            await asyncio.sleep(_backoff(message, self.retry_seconds))
            await message.nack(requeue=True)
            return
        if run is None:
            await message.ack()
            return
        await self._pause()
        self.running = asyncio.create_task(self._run(run, envelope))  # the claim is ours
        try:
            await message.ack()
        except Exception as error:  # redelivered elsewhere, then dropped: claimed here
            log.warning("acking the work of job %s failed: %r", envelope.job_id, error)

    async def _give_back(self, envelope: Envelope, message: RabbitMessage) -> None:
        """Back to its queue. A nack keeps its place (a quorum queue delivers returned
        messages first) but counts as a delivery, so near the delivery limit it goes back
        as a copy instead, at the queue's end: the copy first, then the ack, so a crash
        between leaves a duplicate (dropped by whoever claims second), never a loss."""
        if _deliveries(message) + 1 < self.delivery_limit:
            await message.nack(requeue=True)
            return
        try:
            await self.republish(envelope)
            await message.ack()
        except Exception as error:
            log.warning("giving back the work of job %s: %r; requeued", envelope.job_id, error)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _run(self, run: Awaitable[None], envelope: Envelope) -> None:
        try:
            await run
        except Exception:
            log.exception("the run of job %s failed", envelope.job_id)
        finally:
            self.running = None
            if not self.closed:
                await self._resume()

    async def close(self) -> None:
        """Take no more work: cancel the consumers for good (a held message goes back)."""
        self.closed = True
        async with self._lock:
            await self._pause()

    async def _pause(self) -> None:
        for subscriber in self.subscribers:
            queue, tag = subscriber._queue_obj, subscriber._consumer_tag
            if queue is None or tag is None:
                continue
            try:  # a robust queue forgets the consumer first, so no reconnect restores it
                await queue.cancel(tag)
            except Exception as error:  # the channel is gone, and the consumer with it
                log.debug("cancelling consumer %s: %r", tag, error)
            subscriber._consumer_tag = None

    async def _resume(self) -> None:
        for subscriber in self.subscribers:
            queue = subscriber._queue_obj
            if queue is None or subscriber._consumer_tag is not None:
                continue
            try:
                subscriber._consumer_tag = await queue.consume(
                    subscriber.consume, no_ack=False, arguments=subscriber.consume_args
                )
            except Exception:
                log.exception("consuming %s again failed", queue.name)


def _deliveries(message: RabbitMessage) -> int:
    """How many times the quorum queue delivered this message before (0 the first time)."""
    count = (message.raw_message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


def _backoff(message: RabbitMessage, retry_seconds: float) -> float:
    return float(retry_seconds * 2 ** min(_deliveries(message), 4))
