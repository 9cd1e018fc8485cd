"""The read tables that the projector builds and the api queries (portable SQL)."""

from __future__ import annotations

JOB_COLUMNS = (
    "id",
    "job_name",
    "description",
    "status",
    "config",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "current_epoch",
    "total_epochs",
    "progress_percent",
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "learning_rate",
    "best_epoch",
    "best_val_loss",
    "checkpoint_path",
    "model_path",
    "error_message",
    "attempt",
    "model_architecture",
    "worker",
    "archived",
    "submitted_by",
    "version",
    "position",
)
METRIC_COLUMNS = (
    "job_id",
    "epoch",
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "learning_rate",
    "gradient_norm",
    "val_distance_p50_m",
    "val_distance_p95_m",
    "val_rmse_m",
    "epoch_seconds",
    "samples_per_second",
    "recorded_at",
    "position",
)
READ_TABLES = ("training_jobs", "training_metrics")

DDL = (
    """CREATE TABLE IF NOT EXISTS training_jobs (
        id TEXT PRIMARY KEY, job_name TEXT NOT NULL, description TEXT NOT NULL,
        status TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL, started_at TEXT, completed_at TEXT,
        current_epoch INTEGER NOT NULL, total_epochs INTEGER NOT NULL,
        progress_percent DOUBLE PRECISION NOT NULL, train_loss DOUBLE PRECISION,
        val_loss DOUBLE PRECISION, train_accuracy DOUBLE PRECISION,
        val_accuracy DOUBLE PRECISION, learning_rate DOUBLE PRECISION, best_epoch INTEGER,
        best_val_loss DOUBLE PRECISION, checkpoint_path TEXT, model_path TEXT,
        error_message TEXT, attempt INTEGER NOT NULL, model_architecture TEXT NOT NULL,
        worker TEXT, archived INTEGER NOT NULL, submitted_by TEXT NOT NULL,
        version INTEGER NOT NULL, position BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS training_jobs_by_created ON training_jobs (created_at, id)",
    "CREATE INDEX IF NOT EXISTS training_jobs_by_status ON training_jobs (status, created_at)",
    """CREATE TABLE IF NOT EXISTS training_metrics (
        job_id TEXT NOT NULL, epoch INTEGER NOT NULL, train_loss DOUBLE PRECISION,
        val_loss DOUBLE PRECISION, train_accuracy DOUBLE PRECISION,
        val_accuracy DOUBLE PRECISION, learning_rate DOUBLE PRECISION,
        gradient_norm DOUBLE PRECISION, val_distance_p50_m DOUBLE PRECISION,
        val_distance_p95_m DOUBLE PRECISION, val_rmse_m DOUBLE PRECISION,
        epoch_seconds DOUBLE PRECISION, samples_per_second DOUBLE PRECISION,
        recorded_at TEXT NOT NULL, position BIGINT NOT NULL, PRIMARY KEY (job_id, epoch))""",
    """CREATE TABLE IF NOT EXISTS projector_positions (
        name TEXT PRIMARY KEY, position BIGINT NOT NULL)""",
    "INSERT INTO projector_positions VALUES ('projected', 0) ON CONFLICT (name) DO NOTHING",
    "INSERT INTO projector_positions VALUES ('published', 0) ON CONFLICT (name) DO NOTHING",
    """CREATE TABLE IF NOT EXISTS trainer_leases (
        job_id TEXT PRIMARY KEY, worker TEXT NOT NULL, attempt INTEGER NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
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
