"""Builds the store, the read store and the bus from settings: the one place that does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from eventsourcing.postgres import PostgresDatastore
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from shared.application import TrainingJobs
from shared.bus import Bus, InProcessBus
from shared.readmodel.postgres import PostgresReadStore
from shared.readmodel.sqlite import SQLiteReadStore
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from shared.store import store_env
from shared.waiting import until_reachable

# Services start together and all create what is missing: one at a time, or
# PostgreSQL's CREATE ... IF NOT EXISTS races end in a unique violation.
_DDL_LOCK_KEY = 0x4865696D

# psycopg_pool retries a lost database with doubling delays (1 s, 2 s, 4 s ... for up to
# five minutes), so after an outage the pools could stay empty long after PostgreSQL is
# back. One cheap connect attempt per slot every half second brings them back at once.
AttemptWithBackoff.INITIAL_DELAY = 0.5
AttemptWithBackoff.DELAY_BACKOFF = 1.0


# How long a caller waits for a pooled connection before it gives up (the api waits less
# once it knows the database is down: services/api/availability.py).
POOL_WAIT_SECONDS = 2.0
# What "the database is not reachable yet" looks like, as opposed to a configuration error.
UNREACHABLE = (psycopg.OperationalError, StoreOperationalError, StoreInterfaceError, OSError)
# The store failing under a running service (not a bad input): retried, never a job's fault.
STORE_OUTAGES = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    StoreOperationalError,
    StoreInterfaceError,
)


def build_app(settings: Settings) -> TrainingJobs:
    """The event store application; waits for PostgreSQL if it is not up yet."""
    if not settings.database_url:
        return _open_store(settings)
    app = until_reachable("opening the event store", lambda: _open_store(settings), UNREACHABLE)
    datastore = getattr(app.recorder, "datastore", None)
    if isinstance(datastore, PostgresDatastore):
        datastore.pool.timeout = POOL_WAIT_SECONDS
    return app


def _open_store(settings: Settings) -> TrainingJobs:
    with schema_ready(settings):
        return TrainingJobs(env=store_env(settings))


def build_read_store(settings: Settings) -> ReadStore:
    """The read tables; waits for PostgreSQL if it is not up yet."""
    if not settings.database_url:
        return _open_reads(settings)
    return until_reachable("opening the read tables", lambda: _open_reads(settings), UNREACHABLE)


def _open_reads(settings: Settings) -> ReadStore:
    store: ReadStore
    with schema_ready(settings):
        if settings.database_url:
            store = PostgresReadStore(settings.database_url, settings.database_schema)
        else:
            store = SQLiteReadStore(settings.data_dir / "read.sqlite")
        try:
            store.create_tables()
        except Exception:
            store.close()
            raise
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


def postgres_pools(app: TrainingJobs, reads: ReadStore) -> list[ConnectionPool[Any]]:
    """The connection pools of the event store and the read tables (none on SQLite)."""
    pools: list[ConnectionPool[Any]] = []
    datastore = getattr(app.recorder, "datastore", None)
    if isinstance(datastore, PostgresDatastore):
        pools.append(datastore.pool)
    if isinstance(reads, PostgresReadStore):
        pools.append(reads.pool)
    return pools
