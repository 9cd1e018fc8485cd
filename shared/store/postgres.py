"""PostgreSQL recorder that can also read one stream with its notification ids."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from eventsourcing.persistence import Notification
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresFactory,
)
from psycopg.sql import SQL, Identifier

from shared.store import JobNotifications


class PostgresJobRecorder(PostgresApplicationRecorder, JobNotifications):
    """Fails fast when PostgreSQL is down.

    eventsourcing retries an outage ten times inside each call (seconds, with the pool's
    wait each time); the api must answer 503 within a second instead, and the projector
    and trainers retry with their own backoff. So the store calls are the unretried ones.
    """

    insert_events = PostgresApplicationRecorder.insert_events.__wrapped__
    select_events = PostgresApplicationRecorder.select_events.__wrapped__
    select_notifications = PostgresApplicationRecorder.select_notifications.__wrapped__
    max_notification_id = PostgresApplicationRecorder.max_notification_id.__wrapped__

    def select_stream_notifications(
        self, originator_id: UUID, after: int, limit: int
    ) -> Sequence[Notification]:
        statement = SQL(
            "SELECT * FROM {schema}.{table} WHERE originator_id = %s AND notification_id > %s"
            " ORDER BY notification_id LIMIT %s"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (originator_id, after, limit))
            return [
                Notification(
                    id=row["notification_id"],
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]


class PostgresSnapshotRecorder(PostgresAggregateRecorder):
    """The snapshots table, failing fast like the events table."""

    insert_events = PostgresAggregateRecorder.insert_events.__wrapped__
    select_events = PostgresAggregateRecorder.select_events.__wrapped__


class JobsPostgresFactory(PostgresFactory):
    """eventsourcing's PostgreSQL infrastructure with our fail-fast snapshot recorder."""

    aggregate_recorder_class = PostgresSnapshotRecorder
