"""The read tables that the projector builds and the api queries (portable SQL)."""

from __future__ import annotations

import hashlib

from shared.readmodel.shapes import JobRow, MetricRow, sql_columns

JOB_COLUMNS = tuple(JobRow.model_fields)
METRIC_COLUMNS = ("job_id", *MetricRow.model_fields, "position")
READ_TABLES = ("training_jobs", "training_metrics")

# The read tables, derived from the declared shapes. A change of shape changes this
# text, so its digest tells a process that the tables on disk are of an older shape.
READ_DDL = (
    f"CREATE TABLE IF NOT EXISTS training_jobs ({sql_columns(JobRow)}, PRIMARY KEY (id))",
    "CREATE INDEX IF NOT EXISTS training_jobs_by_created ON training_jobs (created_at, id)",
    "CREATE INDEX IF NOT EXISTS training_jobs_by_status ON training_jobs (status, created_at)",
    "CREATE TABLE IF NOT EXISTS training_metrics ("
    + sql_columns(MetricRow, {"job_id": "TEXT NOT NULL"})
    + ", position BIGINT NOT NULL, PRIMARY KEY (job_id, epoch))",
)
READ_SHAPE = hashlib.sha256("\n".join(READ_DDL).encode()).hexdigest()[:16]

DDL = (
    *READ_DDL,
    """CREATE TABLE IF NOT EXISTS projector_positions (
        name TEXT PRIMARY KEY, position BIGINT NOT NULL)""",
    "INSERT INTO projector_positions VALUES ('projected', 0) ON CONFLICT (name) DO NOTHING",
    "INSERT INTO projector_positions VALUES ('published', 0) ON CONFLICT (name) DO NOTHING",
    """CREATE TABLE IF NOT EXISTS projector_faults (
        stage TEXT PRIMARY KEY, position BIGINT NOT NULL, error TEXT NOT NULL,
        since TEXT NOT NULL, attempts BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS read_shape (
        name TEXT PRIMARY KEY, digest TEXT NOT NULL)""",
)


def upsert(
    table: str, columns: tuple[str, ...], key: tuple[str, ...], source: str | None = None
) -> str:
    """INSERT ... ON CONFLICT DO UPDATE, which SQLite and PostgreSQL both speak: of one row
    of `?` placeholders, or of every row of the table `source`."""
    names = ", ".join(columns)
    values = (
        f"SELECT {names} FROM {source}" if source else f"VALUES ({', '.join('?' * len(columns))})"
    )
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO {table} ({names}) {values}"
        f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )
