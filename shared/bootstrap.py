"""Builds the store, the read store and the bus from settings: the one place that does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from shared.application import TrainingJobs
from shared.bus import Bus, InProcessBus
from shared.readmodel.postgres import PostgresReadStore
from shared.readmodel.sqlite import SQLiteReadStore
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from shared.store import store_env

# Services start together and all create what is missing: one at a time, or
# PostgreSQL's CREATE ... IF NOT EXISTS races end in a unique violation.
_DDL_LOCK_KEY = 0x4865696D


def build_app(settings: Settings) -> TrainingJobs:
    with schema_ready(settings):
        return TrainingJobs(env=store_env(settings))


def build_read_store(settings: Settings) -> ReadStore:
    store: ReadStore
    with schema_ready(settings):
        if settings.database_url:
            store = PostgresReadStore(settings.database_url, settings.database_schema)
        else:
            store = SQLiteReadStore(settings.data_dir / "read.sqlite")
        store.create_tables()
    return store


def build_bus(settings: Settings) -> Bus:
    if settings.broker_url:
        from shared.rabbit import RabbitBus

        return RabbitBus(settings.broker_url, settings.exchange, settings.work_queue)
    return InProcessBus()


@contextmanager
def schema_ready(settings: Settings) -> Iterator[None]:
    """The PostgreSQL schema exists, and no other process is creating tables meanwhile."""
    if not settings.database_url:
        yield
        return
    with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_DDL_LOCK_KEY,))
        try:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.database_schema}"')
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_DDL_LOCK_KEY,))
