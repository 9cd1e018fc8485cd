"""PostgreSQL recorder that can also read one stream with its notification ids."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg.sql import SQL, Identifier

from shared.store import JobNotifications


class PostgresJobRecorder(PostgresApplicationRecorder, JobNotifications):
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
