"""Replay: rebuild the read tables from the store into fresh tables and compare with live."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from services.projector.projection import JobsProjection
from shared.application import TrainingJobs
from shared.bootstrap import build_app
from shared.readmodel.postgres import PostgresReadStore
from shared.readmodel.sqlite import SQLiteReadStore
from shared.readmodel.store import ReadStore, Row
from shared.settings import Settings

BATCH = 500


@dataclass(frozen=True)
class ReplayReport:
    position: int
    events: int
    jobs: int
    metrics: int
    differences: list[str]

    @property
    def equal(self) -> bool:
        return not self.differences


class NothingToReplayError(Exception):
    """The store the settings name cannot be seen, does not exist, or holds no event;
    `unreachable` when it cannot be seen at all (then `allow_empty` does not help)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def store_to_replay(settings: Settings, allow_empty: bool = False) -> TrainingJobs:
    """The event store the settings name, once it is known to exist and to hold events.

    Raises NothingToReplayError naming where it looked; nothing is created first (opening
    a store the usual way makes a missing one). `allow_empty` opens it all the same.
    """
    where = store_location(settings)
    exists = _store_exists(settings, where)  # or NothingToReplayError: it cannot be seen
    if not allow_empty and not exists:
        raise NothingToReplayError(f"no event store at {where}")
    app = build_app(settings)
    if not allow_empty and not app.recorder.max_notification_id():
        raise NothingToReplayError(f"no events in the store at {where}")
    return app


def store_location(settings: Settings) -> str:
    """Where the store is, for people: the SQLite file, or the database and schema (no
    user name or password)."""
    if not settings.database_url:
        return str(_sqlite_path(settings).absolute())
    url = urlsplit(settings.database_url)
    port = f":{url.port}" if url.port else ""
    return f'{url.scheme}://{url.hostname}{port}{url.path} schema "{settings.database_schema}"'


def _sqlite_path(settings: Settings) -> Path:
    return settings.data_dir / "events.sqlite"  # as shared/store/__init__.py names it


def _store_exists(settings: Settings, where: str) -> bool:
    if not settings.database_url:
        folder = settings.data_dir
        if folder.exists() and not folder.is_dir():
            raise NothingToReplayError(
                f"cannot open the store at {where}: {folder} is a file", True
            )
        return _sqlite_path(settings).is_file()
    # eventsourcing names an application's PostgreSQL table after the application.
    table = f'"{settings.database_schema}"."{TrainingJobs.name.lower()}_events"'
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    except psycopg.OperationalError as error:
        reason = (str(error).strip().splitlines() or ["unreachable"])[-1]
        message = f"cannot open the store at {where}: {reason}"
        raise NothingToReplayError(message, unreachable=True) from None
    return bool(found and found[0])


def rebuild(app: TrainingJobs, store: ReadStore, up_to: int) -> int:
    """Project every stored event up to a position into `store`; returns how many."""
    projection, after, count = JobsProjection(app, store), 0, 0
    while after < up_to:
        batch = app.recorder.select_notifications(
            after, BATCH, stop=up_to, inclusive_of_start=False
        )
        if not batch:
            break
        projection.process_batch(batch)
        after, count = batch[-1].id, count + len(batch)
    return count


def replay(app: TrainingJobs, live: ReadStore, settings: Settings) -> ReplayReport:
    """Compare the live tables with a rebuild at the live tables' own position."""
    position, live_jobs, live_metrics = live.snapshot()
    with fresh_store(settings) as fresh:
        events = rebuild(app, fresh, position)
        _, jobs, metrics = fresh.snapshot()
    differences = diff("training_jobs", live_jobs, jobs, "id")
    differences += diff("training_metrics", live_metrics, metrics, "job_id", "epoch")
    return ReplayReport(position, events, len(jobs), len(metrics), differences)


def diff(table: str, live: list[Row], rebuilt: list[Row], *key: str) -> list[str]:
    live_by = {tuple(r[k] for k in key): r for r in live}
    rebuilt_by = {tuple(r[k] for k in key): r for r in rebuilt}
    out = []
    for k in sorted(live_by.keys() | rebuilt_by.keys(), key=str):
        a, b = live_by.get(k), rebuilt_by.get(k)
        if a != b:
            out.append(f"{table} {k}: live={a} replayed={b}")
    return out


@contextmanager
def fresh_store(settings: Settings) -> Iterator[ReadStore]:
    """Empty read tables beside the live ones, dropped afterwards."""
    store: ReadStore
    if not settings.database_url:
        with tempfile.TemporaryDirectory() as folder:
            store = SQLiteReadStore(Path(folder) / "replay.sqlite")
            store.create_tables()
            yield store
        return
    schema = f"replay_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    store = PostgresReadStore(settings.database_url, schema, pool_size=2)
    try:
        store.create_tables()
        yield store
    finally:
        store.close()
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
