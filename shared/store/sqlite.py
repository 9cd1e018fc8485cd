"""SQLite recorder that can also read one stream with its notification ids (rowids)."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from eventsourcing.persistence import Notification
from eventsourcing.sqlite import SQLiteApplicationRecorder

from shared.store import JobNotifications


class SQLiteJobRecorder(SQLiteApplicationRecorder, JobNotifications):
    def select_stream_notifications(
        self, originator_id: UUID, after: int, limit: int
    ) -> Sequence[Notification]:
        statement = (
            f"SELECT rowid, * FROM {self.events_table_name}"
            " WHERE originator_id = ? AND rowid > ? ORDER BY rowid LIMIT ?"
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement, (originator_id.hex, after, limit))
            return [
                Notification(
                    id=row["rowid"],
                    originator_id=self.convert_originator_id(row["originator_id"]),
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=row["state"],
                )
                for row in c.fetchall()
            ]
