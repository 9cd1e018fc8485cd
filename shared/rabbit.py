"""The RabbitMQ bus: a durable topic exchange, a quorum work queue, private fan-out queues."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence

from aio_pika import DeliveryMode, Message
from aio_pika.exceptions import PublishError
from faststream import AckPolicy, FastStream
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
from faststream.specification import AsyncAPI

from shared.bus import (
    ALL_KEYS,
    NUDGE_KEYS,
    ROUTING_KEYS,
    TELEMETRY_KEY,
    WORK_KEYS,
    Bus,
    Envelope,
    Handler,
)
from shared.waiting import retrying_until

log = logging.getLogger(__name__)
BUS_VERSION = "1.0.0"
DOCS_URL = "amqp://guest:guest@rabbitmq:5672/"
HEALTH_SECONDS = 1.0
PING_SECONDS = 0.2
# How long `start` waits for the first connection before leaving it to the background.
START_WAIT_SECONDS = 5.0
DEAD_LETTER_MAX = 100_000
Consumer = Callable[..., Awaitable[None]]
_PUBLISHED = {TELEMETRY_KEY: "Live step telemetry between epochs; never in the store."}


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

    Work queue: quorum, prefetch 1, acked after the handler returns. A failing handler
    backs off (doubling from `retry_seconds`) and nacks to requeue; past
    `delivery_limit` redeliveries the broker dead-letters the message to
    `<work_queue>.dead` instead of looping on a poison message.

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
        self._dead = RabbitQueue(
            f"{work_queue}.dead",
            durable=True,
            arguments={"x-max-length": DEAD_LETTER_MAX, "x-overflow": "drop-head"},
        )
        self._work = RabbitQueue(
            work_queue,
            queue_type=QueueType.QUORUM,
            routing_key=WORK_KEYS[0],
            arguments={
                "x-delivery-limit": delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self._dead.name,
            },
        )
        self._bindings: list[tuple[RabbitQueue, tuple[str, ...]]] = [(self._work, WORK_KEYS)]
        self._retry_seconds, self._publish_seconds = retry_seconds, publish_seconds
        self._private_id = private_id
        self._fanouts: list[Handler] = []
        self._started = self._running = False
        self._stopping = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None
        self._telemetry_channel = Channel(publisher_confirms=False)
        keys = (*ROUTING_KEYS.values(), TELEMETRY_KEY)
        self._publishers = {key: self._publisher(key) for key in keys}

    @property
    def broker(self) -> RabbitBroker:
        return self._broker

    def bindings(self) -> dict[str, tuple[str, ...]]:
        """Queue name → the topic patterns it is bound to."""
        return {queue.name: keys for queue, keys in self._bindings}

    def subscribe_work(self, handler: Handler) -> None:
        self._broker.subscriber(
            self._work,
            self._exchange,
            ack_policy=AckPolicy.NACK_ON_ERROR,
            title=f"{self._work.name}:consume",
            description=_describe(handler, WORK_KEYS),
        )(_work_consumer(handler, self._retry_seconds))

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
        publishing = self._publishers[key].publish(envelope, message_id=str(envelope.position))
        try:
            await asyncio.wait_for(publishing, self._publish_seconds)
        except PublishError:
            if key in WORK_KEYS:
                raise
            log.debug("no queue for %s; dropped position %d", key, envelope.position)

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


def _describe(handler: Handler, keys: Sequence[str]) -> str:
    doc = (handler.__doc__ or "").strip().splitlines()
    return " ".join([*doc[:1], f"Bound to {', '.join(keys)}."])


def _fanout_consumer(handler: Handler) -> Consumer:
    async def consume(envelope: Envelope) -> None:
        await handler(envelope)

    return consume


def _work_consumer(handler: Handler, retry_seconds: float) -> Consumer:
    async def consume(envelope: Envelope, message: RabbitMessage) -> None:
        try:
            await handler(envelope)
        except Exception:
            await asyncio.sleep(_backoff(message, retry_seconds))
            raise

    return consume


def _backoff(message: RabbitMessage, retry_seconds: float) -> float:
    count = (message.raw_message.headers or {}).get("x-delivery-count", 0)
    return float(retry_seconds * 2 ** min(count if isinstance(count, int) else 0, 4))


def asyncapi_app() -> FastStream:
    """The bus as its services use it: `python -m shared.rabbit > docs/asyncapi.json`."""
    bus = RabbitBus(DOCS_URL, private_id=lambda: "{uuid}")
    bus.subscribe_work(_trainer_claims)
    bus.subscribe_fanout(NUDGE_KEYS, _trainer_nudges)
    bus.subscribe_fanout(ALL_KEYS, _api_live_events)
    spec = AsyncAPI(
        bus.broker,
        title="Heimdall Training bus",
        version=BUS_VERSION,
        description="Every event of the training event store, published in store order by "
        "the projector; message id = store position.",
    )
    return FastStream(bus.broker, specification=spec)


async def _trainer_claims(envelope: Envelope) -> None:
    """Trainers compete for runnable jobs (submitted, resume requested, worker lost)."""


async def _trainer_nudges(envelope: Envelope) -> None:
    """Each trainer hears pause and cancel requests, confirmed against the store."""


async def _api_live_events(envelope: Envelope) -> None:
    """Each api replica relays every event to its WebSocket clients."""


def asyncapi_json() -> str:
    """The AsyncAPI document, keys sorted so that regenerating it gives a stable diff."""
    document = asyncapi_app().schema.to_specification().to_jsonable()
    return json.dumps(document, indent=2, sort_keys=True)


if __name__ == "__main__":
    print(asyncapi_json())
