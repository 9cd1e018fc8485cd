"""The event store: eventsourcing's recorders, plus reading one job's notifications."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.persistence import Notification

from shared.settings import Settings


class JobNotifications(ABC):
    """What the stock recorders lack: one stream's events with their positions."""

    @abstractmethod
    def select_stream_notifications(
        self, originator_id: UUID, after: int, limit: int
    ) -> Sequence[Notification]:
        """The stream's notifications with positions greater than `after`, in order."""


def store_env(settings: Settings) -> dict[str, str]:
    """The eventsourcing environment for the configured backend."""
    common = {
        "SUBMIT_BATCH": str(settings.submit_batch),
        "TRANSCODER_TOPIC": "shared.store.transcoder:FastJSONTranscoder",
    }
    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return common | {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(settings.data_dir / "events.sqlite"),
            "SQLITE_LOCK_TIMEOUT": "10",
            "APPLICATION_RECORDER_TOPIC": "shared.store.sqlite:SQLiteJobRecorder",
        }
    url = urlsplit(settings.database_url)
    return common | {
        "PERSISTENCE_MODULE": "shared.store.postgres:JobsPostgresFactory",
        "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres",
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or "postgres"),
        "POSTGRES_SCHEMA": settings.database_schema,
        # Two held, up to twenty under load: a cluster of idle services must not use up
        # PostgreSQL's connection limit (100 by default).
        "POSTGRES_POOL_SIZE": "2",
        "POSTGRES_MAX_OVERFLOW": "18",
        # The pool's wait for a connection: an outage is a 503 within a second, not a hang.
        "POSTGRES_CONNECT_TIMEOUT": "1",
        "POSTGRES_LOCK_TIMEOUT": "5",
        "APPLICATION_RECORDER_TOPIC": "shared.store.postgres:PostgresJobRecorder",
    }
