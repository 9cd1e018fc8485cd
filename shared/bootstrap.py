"""Builds the store, the read store and the bus from settings: the one place that does."""

from __future__ import annotations

import psycopg

from shared.application import TrainingJobs
from shared.bus import Bus, InProcessBus
from shared.readmodel.postgres import PostgresReadStore
from shared.readmodel.sqlite import SQLiteReadStore
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from shared.store import store_env


def build_app(settings: Settings) -> TrainingJobs:
    if settings.database_url:
        ensure_schema(settings.database_url, settings.database_schema)
    return TrainingJobs(env=store_env(settings))


def build_read_store(settings: Settings) -> ReadStore:
    store: ReadStore
    if settings.database_url:
        ensure_schema(settings.database_url, settings.database_schema)
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


def ensure_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
