"""Live streams across broker trouble (DESIGN §2.3, §5): the api's link to RabbitMQ is cut
while events flow, and every socket still gets exactly the store's events, once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aio_pika
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared.bootstrap import build_app, build_read_store
from shared.rabbit import work_queue_names
from shared.settings import Settings
from tests.conftest import RABBIT_URL
from tests.faults import Proxy
from tests.integration.test_cluster import Cluster
from tests.live import Message, Received, assert_matches_the_store, receive, ws_base
from tests.processes import API, TERMINAL, wait_healthy, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]
JOBS = 12
WATCHED = 6  # jobs that also have a socket of their own
EVERYTHING = 2  # all-jobs sockets
READ_SECONDS = 30.0
BLIP_EVENTS = 20


@pytest.fixture
async def cluster(postgres_settings: Settings, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Store and broker names of its own; no trainer: the events come from commands."""
    suffix = uuid.uuid4().hex[:8]
    settings = postgres_settings.model_copy(
        update={
            "broker_url": RABBIT_URL,
            "exchange": f"heimdall.training.{suffix}",
            "work_queue": f"heimdall.training.work.{suffix}",
            "artifacts_dir": tmp_path / "artifacts",
        }
    )
    running = Cluster(settings, tmp_path)
    try:
        yield running
    finally:
        running.stop()
        print(running.logs())  # shown when the test failed
        await forget(settings)


async def forget(settings: Settings) -> None:
    """The broker drops the test's exchange and queues."""
    async with await aio_pika.connect(RABBIT_URL, timeout=5) as connection:
        channel = await connection.channel()
        for queue in work_queue_names(settings.work_queue).values():
            await channel.queue_delete(queue)
        await channel.exchange_delete(settings.exchange)


class Streams:
    """Open sockets, each read into its `Received` by a task of its own."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self.stack = stack
        self.per_job: dict[str, Received] = {}
        self.everything: list[Received] = []
        self._reading: set[asyncio.Task[Received]] = set()

    async def open(self, url: str, ended: set[str] | None = None) -> Received:
        """Connected; read on until the server closes or (all-jobs) every job `ended`."""
        socket: ClientConnection = await self.stack.enter_async_context(connect(url))
        received = await receive(socket, Received(), until=lambda m: m["event"] == "connected")
        done = None if ended is None else all_ended(ended)
        reading = receive(socket, received, until=done, seconds=10 * READ_SECONDS)
        self._reading.add(asyncio.create_task(reading))
        return received

    async def finish(self) -> None:
        """Give the sockets `READ_SECONDS` to get everything; keep what they got."""
        _, late = await asyncio.wait(self._reading, timeout=READ_SECONDS)
        for task in late:
            task.cancel()
        await asyncio.gather(*self._reading, return_exceptions=True)


def all_ended(jobs: set[str]) -> Callable[[Message], bool]:
    """For an all-jobs socket: True once every job's terminal event has arrived."""
    waiting = set(jobs)

    def done(message: Message) -> bool:
        if "position" in message and message.get("status") in TERMINAL:
            waiting.discard(str(message["job_id"]))
        return not waiting

    return done


@contextlib.asynccontextmanager
async def streams() -> AsyncIterator[Streams]:
    async with contextlib.AsyncExitStack() as stack:
        yield Streams(stack)


def command(client: httpx.Client, job_id: str, verb: str) -> None:
    response = client.post(f"{API}/jobs/{job_id}/{verb}")
    assert response.status_code == 202, response.text


def broker_is(client: httpx.Client, state: str) -> bool:
    return bool(client.get("/health").json()["broker"] == state)


def wait_everything_published(settings: Settings) -> None:
    """The projector has published the store's last event (to the exchange, confirmed)."""
    app, reads = build_app(settings), build_read_store(settings)
    try:
        head = app.recorder.max_notification_id() or 0
        wait_until(lambda: reads.positions()["published"] >= head, 30, "the projector to publish")
    finally:
        reads.close()
        app.close()


def feed_positions(client: httpx.Client) -> list[int]:
    """Every position in the store, from the global feed."""
    positions: list[int] = []
    while True:
        after = positions[-1] if positions else 0
        page = client.get(f"{API}/events", params={"after": after, "limit": 1000}).json()
        if not page["events"]:
            return positions
        positions += [e["position"] for e in page["events"]]


def assert_same(got: list[int], stored: list[int]) -> None:
    """The store's positions, each once, in order; else say what is missing or repeated."""
    missing = sorted(set(stored) - set(got))
    repeated = sorted({p for p in got if got.count(p) > 1})
    assert got == stored, f"missing {missing}, repeated {repeated}, {len(got)}/{len(stored)}"


def grown(client: httpx.Client, by: int) -> None:
    """Wait until `by` more events are in the store."""
    goal = len(feed_positions(client)) + by
    wait_until(lambda: len(feed_positions(client)) >= goal, 60, f"{by} more events")


def flow(client: httpx.Client, jobs: list[str], stop: threading.Event) -> int:
    """Pause and resume the jobs round and round until told to stop; how many rounds."""
    rounds = 0
    while not stop.is_set() or rounds == 0:
        for job_id in jobs:
            command(client, job_id, "pause")
            command(client, job_id, "resume")
        rounds += 1
    return rounds


async def test_every_socket_gets_every_stored_event_once_and_in_order_across_broker_cuts(
    cluster: Cluster, rabbit_proxy: Proxy
) -> None:
    cluster.start("api", "api", broker_url=rabbit_proxy.url)  # the projector connects directly
    cluster.start("projector", "projector")
    client = cluster.client
    await asyncio.to_thread(wait_healthy, client)
    jobs = [await asyncio.to_thread(cluster.submit) for _ in range(JOBS)]
    watched, base = jobs[:WATCHED], ws_base(client)
    async with streams() as live:
        for job_id in watched:
            live.per_job[job_id] = await live.open(f"{base}/ws/training/{job_id}?after=0")
        for _ in range(EVERYTHING):
            live.everything.append(await live.open(f"{base}/ws/training?after=0", set(jobs)))

        for job_id in jobs:  # the link is up
            await asyncio.to_thread(command, client, job_id, "pause")

        rabbit_proxy.cut(stay_down=True)  # the api's queue is gone with its connection
        await asyncio.to_thread(wait_until, lambda: broker_is(client, "down"), 30, "the cut")
        for job_id in jobs:
            await asyncio.to_thread(command, client, job_id, "resume")
        for job_id in (*watched[:2], *jobs[WATCHED : WATCHED + 2]):  # their last events
            await asyncio.to_thread(command, client, job_id, "cancel")
        await asyncio.to_thread(wait_everything_published, cluster.settings)
        rabbit_proxy.open()
        await asyncio.to_thread(wait_until, lambda: broker_is(client, "ok"), 60, "the reconnect")

        # A blip while commands flow: the api's link drops and comes back mid-stream.
        flowing = [j for j in jobs if j not in (*watched[:2], *jobs[WATCHED : WATCHED + 2])]
        stop = threading.Event()
        driver = asyncio.create_task(asyncio.to_thread(flow, client, flowing, stop))
        await asyncio.to_thread(grown, client, BLIP_EVENTS)
        rabbit_proxy.cut()
        await asyncio.to_thread(grown, client, BLIP_EVENTS)  # it flowed on across the blip
        await asyncio.to_thread(wait_until, lambda: broker_is(client, "ok"), 60, "the reconnect")
        stop.set()
        assert await driver >= 1

        for job_id in flowing:  # every job ends, so every socket knows when it has all
            await asyncio.to_thread(command, client, job_id, "cancel")
        await live.finish()

    stored = feed_positions(client)
    for received in live.everything:
        assert_same(received.positions(), stored)
    for job_id, received in live.per_job.items():
        assert_matches_the_store(received.positions(), client, job_id)
        assert received.close_code == 1000, (job_id, received.close_code)
