"""Fixtures shared by every test: settings on a fresh SQLite folder or PostgreSQL schema."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aio_pika
import psycopg
import pytest

from shared.rabbit import work_queue_names
from shared.settings import Settings

POSTGRES_URL = os.environ.get(
    "HEIMDALL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
RABBIT_URL = os.environ.get("HEIMDALL_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def broker_settings(postgres_settings: Settings) -> Iterator[Settings]:
    """PostgreSQL settings with RabbitMQ names of this test's own (exchange, work queues),
    deleted after it: durable quorum queues left by every run would pile up on the broker."""
    suffix = uuid.uuid4().hex[:8]
    settings = postgres_settings.model_copy(
        update={
            "broker_url": RABBIT_URL,
            "exchange": f"heimdall.training.{suffix}",
            "work_queue": f"heimdall.training.work.{suffix}",
        }
    )
    yield settings
    asyncio.run(drop_broker_names(settings))


async def drop_broker_names(settings: Settings) -> None:
    """Delete the exchange and every work queue (`work_queue_names`) of `settings`."""
    connection = await aio_pika.connect(RABBIT_URL, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in work_queue_names(settings.work_queue).values():
            await channel.queue_delete(queue)
        await channel.exchange_delete(settings.exchange)


def drop_schema(schema: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", poll_seconds=0.05, _env_file=None)


@pytest.fixture
def postgres_settings(tmp_path: Path) -> Iterator[Settings]:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield Settings(
        database_url=POSTGRES_URL,
        database_schema=schema,
        data_dir=tmp_path / "var",
        poll_seconds=0.05,
    )
    drop_schema(schema)


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest) -> Settings:
    """The same test on each backend, as eventsourcing's own examples do."""
    fixture: Settings = request.getfixturevalue(f"{request.param}_settings")
    return fixture


SettingsFactory = Callable[[], Settings]
