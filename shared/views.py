"""How a job looks to readers: one mapping from the aggregate to a read row."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from shared.domainmodel import TrainingJob
from shared.readmodel.schema import METRIC_COLUMNS

Row = dict[str, Any]
METRIC_NAMES = METRIC_COLUMNS[2:-2]


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def finite(value: Any) -> float | None:
    """Numbers for JSON: NaN and infinities become null."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def job_row(job: TrainingJob, position: int) -> Row:
    """The `training_jobs` row of a job's current state."""
    last = job.last_metrics
    total = max(job.total_epochs, 1)
    return {
        "id": str(job.id),
        "job_name": job.job_name,
        "description": job.description,
        "status": job.status,
        "config": json.dumps(job.config, sort_keys=True),
        "created_at": iso(job.created_on),
        "updated_at": iso(job.modified_on),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "current_epoch": job.current_epoch,
        "total_epochs": job.total_epochs,
        "progress_percent": round(100.0 * job.current_epoch / total, 2),
        "train_loss": finite(last.get("train_loss")),
        "val_loss": finite(last.get("val_loss")),
        "train_accuracy": finite(last.get("train_accuracy")),
        "val_accuracy": finite(last.get("val_accuracy")),
        "learning_rate": finite(last.get("learning_rate")),
        "best_epoch": job.best_epoch,
        "best_val_loss": finite(job.best_val_loss),
        "checkpoint_path": job.checkpoint_path,
        "model_path": job.model_path,
        "error_message": job.error_message,
        "attempt": job.attempt,
        "model_architecture": str(job.config.get("model_architecture", "")),
        "worker": job.worker,
        "archived": int(job.archived),
        "submitted_by": job.submitted_by,
        "version": job.version,
        "position": position,
    }


def metric_row(job_id: str, metrics: dict[str, Any], recorded_at: datetime, position: int) -> Row:
    """The `training_metrics` row of one `EpochCompleted`."""
    row: Row = {"job_id": job_id, "epoch": int(metrics["epoch"])}
    row.update({name: finite(metrics.get(name)) for name in METRIC_NAMES})
    row.update({"recorded_at": iso(recorded_at), "position": position})
    return row


def job_json(row: Row) -> Row:
    """A read row as the api returns it (config parsed, flags as booleans)."""
    out = {k: v for k, v in row.items() if k not in ("position", "worker", "submitted_by")}
    out["config"] = json.loads(row["config"])
    out["archived"] = bool(row["archived"])
    return out


def metric_json(row: Row) -> Row:
    return {k: v for k, v in row.items() if k not in ("job_id", "position")}
