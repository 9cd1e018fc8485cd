"""How a job looks to readers: one mapping from the aggregate to its read rows.

The rows' fields are those declared in `shared/readmodel/shapes.py`, bound by name.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from pydantic_core import from_json

from shared.domainmodel import TrainingJob
from shared.readmodel.shapes import (
    JOB_METRIC_FIELDS,
    JOB_STATE_FIELDS,
    JOB_TYPE,
    METRIC_ROW_FIELDS,
    EpochMetrics,
)

Row = dict[str, Any]
METRIC_NAMES = tuple(name for name in EpochMetrics.model_fields if name != "epoch")


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def finite(value: Any) -> float | None:
    """Numbers for JSON: NaN and infinities become null."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def job_row(job: TrainingJob, position: int) -> Row:
    """The `training_jobs` row of a job's current state (keys: `JobRow`'s fields)."""
    last = job.last_metrics
    total = max(job.total_epochs, 1)
    return {
        "id": str(job.id),
        "job_type": JOB_TYPE,
        "job_name": job.job_name,
        "description": job.description,
        "status": job.status,
        "allowed_commands": json.dumps(job.allowed_commands()),
        "config": json.dumps(job.config, sort_keys=True),
        "created_at": iso(job.created_on),
        "updated_at": iso(job.modified_on),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "current_epoch": job.current_epoch,
        "total_epochs": job.total_epochs,
        "progress_percent": round(100.0 * job.current_epoch / total, 2),
        **{name: finite(last.get(name)) for name in JOB_METRIC_FIELDS},
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
        "device": job.device,
        "parameter_count": job.parameter_count,
        "warnings": json.dumps(job.current_warnings()),
        "position": position,
    }


def metric_row(job_id: str, metrics: dict[str, Any], recorded_at: datetime, position: int) -> Row:
    """The `training_metrics` row of one `EpochCompleted` (keys: `METRIC_COLUMNS`).

    Metrics an older event does not carry are null."""
    row: Row = {"job_id": job_id, "epoch": int(metrics["epoch"])}
    row.update({name: finite(metrics.get(name)) for name in METRIC_NAMES})
    row.update(recorded_at=iso(recorded_at), timestamp=iso(recorded_at), position=position)
    return row


def job_json(row: Row, progress: Row | None = None) -> Row:
    """A read row as the api returns it (`JobView`: JSON parsed, flags as booleans), with
    the live-only `progress` when the caller heard one (`LiveProgress`'s fields)."""
    out = {name: row[name] for name in JOB_STATE_FIELDS}
    for name in ("config", "allowed_commands", "warnings"):
        out[name] = from_json(row[name])  # pydantic-core's parser: 2.7x json.loads here
    out["archived"] = bool(row["archived"])
    out["progress"] = progress
    out["waiting"] = None  # live-only, from the work queues: `ApiContext.job_view`
    return out


def metric_json(row: Row) -> Row:
    """A `training_metrics` row as the api returns it (`MetricRow`)."""
    return {name: row[name] for name in METRIC_ROW_FIELDS}
