"""The shapes readers see, each declared once: an epoch's metrics and a job's read row.

Everything else binds to these classes by field name: the read tables' columns and DDL
(`shared/readmodel/schema.py`), the REST schemas, the WebSocket `data`, what the trainer
records in `EpochCompleted`, the CLI's tables and the dashboard (which reads the REST
schemas from `/openapi.json`). Adding a metric is one field here plus its computation.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

JOB_TYPE: Literal["training"] = "training"


def _baseline(method: str, quantile: str) -> Any:
    return Field(
        None,
        description=f"{quantile} validation distance error of {method} on the same split,"
        " metres; measured at the job's start, the same every epoch (README: Baselines)",
    )


class EpochMetrics(BaseModel):
    """One epoch's metrics as the trainer records them (`EpochCompleted.metrics`).

    Losses are the Gaussian negative log-likelihood of the normalised position, with the
    constant dropped: it goes negative once the model is confident and right. Distances
    are great-circle metres between predicted and true transmitter positions.
    """

    epoch: int = Field(description="1-based epoch number")
    train_loss: float | None = Field(
        None, description="mean Gaussian NLL over the epoch's training samples (can be < 0)"
    )
    val_loss: float | None = Field(None, description="mean Gaussian NLL on the validation split")
    train_accuracy: float | None = Field(
        None, description="share (0..1) of training predictions within accuracy_radius_m"
    )
    val_accuracy: float | None = Field(
        None, description="share (0..1) of validation predictions within accuracy_radius_m"
    )
    learning_rate: float | None = Field(None, description="learning rate at the epoch's last step")
    gradient_norm: float | None = Field(
        None, description="mean pre-clipping L2 gradient norm per training step"
    )
    train_rmse_m: float | None = Field(
        None, description="root mean square training distance error, metres"
    )
    val_distance_p50_m: float | None = Field(
        None, description="median validation distance error, metres"
    )
    val_distance_p68_m: float | None = Field(
        None, description="68th percentile of validation distance error, metres (the KPI)"
    )
    val_distance_p95_m: float | None = Field(
        None, description="95th percentile of validation distance error, metres"
    )
    val_rmse_m: float | None = Field(
        None, description="root mean square validation distance error, metres"
    )
    mean_predicted_uncertainty_m: float | None = Field(
        None,
        description="mean over validation samples of the model's own 1-sigma radius, metres:"
        " sqrt of the predicted variance of latitude plus longitude, scaled to metres",
    )
    uncertainty_calibration_error: float | None = Field(
        None,
        description="absolute difference between 0.68 and the share of validation truths"
        " inside the predicted 68 % region; 0 is perfectly calibrated",
    )
    val_inside_68: float | None = Field(
        None,
        description="share (0..1) of validation truths inside the model's predicted 68 %"
        " region (squared Mahalanobis distance <= 2.279); 0.68 when calibrated",
    )
    val_inside_1_sigma: float | None = Field(
        None,
        description="share (0..1) of validation truths inside the model's predicted 1-sigma"
        " ellipse (Mahalanobis distance <= 1); 0.393 when calibrated, as the region is 2-D",
    )
    baseline_centre_p50_m: float | None = _baseline("predicting the region's centre", "median")
    baseline_centre_p68_m: float | None = _baseline("predicting the region's centre", "p68")
    baseline_centre_p95_m: float | None = _baseline("predicting the region's centre", "p95")
    baseline_centroid_p50_m: float | None = _baseline("the power-weighted centroid", "median")
    baseline_centroid_p68_m: float | None = _baseline("the power-weighted centroid", "p68")
    baseline_centroid_p95_m: float | None = _baseline("the power-weighted centroid", "p95")
    baseline_knn_p50_m: float | None = _baseline("a kNN on receiver powers", "median")
    baseline_knn_p68_m: float | None = _baseline("a kNN on receiver powers", "p68")
    baseline_knn_p95_m: float | None = _baseline("a kNN on receiver powers", "p95")
    epoch_seconds: float | None = Field(
        None, description="seconds spent training and validating this epoch"
    )
    epoch_duration_seconds: float | None = Field(
        None,
        description="wall-clock seconds from the end of the previous epoch (or the attempt's"
        " start) to this epoch's record: data, steps, validation and waiting included",
    )
    samples_per_second: float | None = Field(
        None, description="training samples per second over the epoch's steps"
    )


class MetricRow(EpochMetrics):
    """One epoch of a job as the api returns it (`training_metrics` adds job_id, position)."""

    recorded_at: str = Field(description="when the epoch was recorded, ISO-8601 UTC")
    timestamp: str = Field(description="the same moment as recorded_at (the frontend's name)")


class StepProgress(BaseModel):
    """Where a running job is inside an epoch: the trainer's live telemetry (`training.step`
    on the bus, at most one a second per job), never stored."""

    epoch: int = Field(description="the epoch being trained, 1-based")
    total_epochs: int | None = Field(None, description="the epochs the job will train")
    step: int = Field(description="training steps done in this epoch, 1-based")
    steps_per_epoch: int
    loss: float | None = Field(None, description="the last step's mean training loss (NLL)")
    samples_per_second: float | None = Field(
        None, description="training samples per second over the epoch's steps so far"
    )
    eta_seconds: float | None = Field(
        None,
        description="seconds until the last epoch ends at this attempt's pace so far (its"
        " validations included); from the first step on",
    )


class LiveProgress(StepProgress):
    """A running job's last step telemetry as an api replica last heard it."""

    reported_at: str = Field(description="when the trainer sent it, ISO-8601 UTC")


class JobState(BaseModel):
    """A job's state as the projection derives it from the store (the read table's part)."""

    id: str = Field(description="the job's id (a UUID)")
    job_type: Literal["training"] = Field(JOB_TYPE, description="always `training`")
    job_name: str
    description: str
    status: str = Field(description="the status the domain computed after the last event")
    allowed_commands: list[str] = Field(
        description="the commands (pause, resume, cancel) this status allows, as the domain"
        " decides: a client offers these and no others"
    )
    config: dict[str, Any] = Field(description="the validated job config")
    created_at: str = Field(description="ISO-8601 UTC")
    updated_at: str = Field(description="ISO-8601 UTC, the last event's time")
    started_at: str | None = Field(description="ISO-8601 UTC of the first start")
    completed_at: str | None = Field(description="ISO-8601 UTC of the terminal event")
    current_epoch: int = Field(description="the last epoch recorded")
    total_epochs: int
    progress_percent: float = Field(description="0..100, by recorded epochs")
    train_loss: float | None
    val_loss: float | None
    train_accuracy: float | None
    val_accuracy: float | None
    learning_rate: float | None
    best_epoch: int | None
    best_val_loss: float | None
    checkpoint_path: str | None
    model_path: str | None
    error_message: str | None
    attempt: int = Field(description="how many times a trainer has claimed the job")
    model_architecture: str
    archived: bool = Field(description="archived jobs leave GET /jobs unless include_archived")
    version: int = Field(description="the job stream's version (number of events)")
    device: str | None = Field(
        description="where the last claim runs it, as its trainer says (`cuda:0 (bf16)`,"
        " `cpu (fp32)`), from `Started` or `Resumed`; null before the first claim"
    )
    parameter_count: int | None = Field(
        description="the model's trainable parameters, counted at submit; null for jobs"
        " submitted before this was counted"
    )
    warnings: list[str] = Field(
        description="what the job will cost, from the submit (a big model where no GPU may"
        " run it) and from the claim on (it runs on a CPU although it did not ask for one)"
    )

    @field_validator("config", "allowed_commands", "warnings", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value


class JobView(JobState):
    """A job as the api returns it (`GET /jobs`, `GET /jobs/{id}`, WebSocket status)."""

    progress: LiveProgress | None = Field(
        None,
        description="live-only: the running job's last step telemetry, as this api replica"
        " heard it; never stored, so not in replay's comparison; null unless the job runs"
        " and its trainer has reported a step",
    )
    waiting: str | None = Field(
        None,
        description="live-only: why a queued job has not started, from the work queues as"
        " this api replica last saw them (no connected trainer takes its kind of work, or"
        " all that do are busy); null unless queued",
    )


class JobRow(JobState):
    """The `training_jobs` row: the state plus what only the api's internals read."""

    worker: str | None = Field(description="the trainer running it, if any")
    submitted_by: str
    position: int = Field(description="store position of the last event projected")


# The fields of the last epoch's metrics that a job row repeats.
JOB_METRIC_FIELDS = tuple(f for f in JobState.model_fields if f in EpochMetrics.model_fields)
# Columns of `training_metrics`: the key, every metric, when, and the position.
METRIC_ROW_FIELDS = tuple(MetricRow.model_fields)
JOB_FIELDS = tuple(JobView.model_fields)
JOB_STATE_FIELDS = tuple(JobState.model_fields)
LIVE_FIELDS = tuple(f for f in JOB_FIELDS if f not in JOB_STATE_FIELDS)
JOB_ROW_FIELDS = tuple(JobRow.model_fields)
SQL_TYPES = {str: "TEXT", int: "BIGINT", float: "DOUBLE PRECISION", bool: "INTEGER"}


def sql_columns(model: type[BaseModel], extra: dict[str, str] | None = None) -> str:
    """`name TYPE [NOT NULL], ...` for each field of `model` (dicts are JSON text)."""
    columns = dict(extra or {})
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nullable = type(None) in getattr(annotation, "__args__", ())
        base = next(
            (t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None)),
            str,
        )
        sql = SQL_TYPES.get(base, "TEXT") if isinstance(base, type) else "TEXT"
        columns[name] = sql if nullable else f"{sql} NOT NULL"
    return ", ".join(f"{name} {sql}" for name, sql in columns.items())
