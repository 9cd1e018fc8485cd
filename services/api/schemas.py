"""The api's request and response bodies (the Heimdall frontend reads these names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.application import StoredJobEvent
from shared.bus import routing_key, websocket_event
from shared.config import JobConfig


class SubmitJob(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    job_name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=10_000)
    config: JobConfig = Field(default_factory=JobConfig)


class Job(BaseModel):
    id: str
    job_name: str
    description: str
    status: str
    config: dict[str, Any]
    created_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    current_epoch: int
    total_epochs: int
    progress_percent: float
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
    attempt: int
    model_architecture: str
    archived: bool
    version: int


class CommandResult(Job):
    job_id: str
    message: str


class JobList(BaseModel):
    jobs: list[Job]
    total: int


class MetricRow(BaseModel):
    epoch: int
    train_loss: float | None
    val_loss: float | None
    train_accuracy: float | None
    val_accuracy: float | None
    learning_rate: float | None
    gradient_norm: float | None
    val_distance_p50_m: float | None
    val_distance_p95_m: float | None
    val_rmse_m: float | None
    epoch_seconds: float | None
    samples_per_second: float | None
    recorded_at: str


class JobDetail(BaseModel):
    job: Job
    recent_metrics: list[MetricRow]
    websocket_url: str


class EventOut(BaseModel):
    position: int
    job_id: str
    version: int
    kind: str
    event: str
    timestamp: datetime
    actor: str
    data: dict[str, Any]

    @classmethod
    def of(cls, stored: StoredJobEvent) -> EventOut:
        return cls(
            position=stored.position,
            job_id=str(stored.job_id),
            version=stored.version,
            kind=stored.kind,
            event=websocket_event(routing_key(stored.kind)),
            timestamp=stored.timestamp,
            actor=stored.actor,
            data=stored.data,
        )


class EventPage(BaseModel):
    events: list[EventOut]
    last_position: int


class Health(BaseModel):
    status: str
    store: str
    read_store: str
    broker: str


class ErrorOut(BaseModel):
    detail: Any
    status: str | None = None
    errors: list[Any] | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body is not JSON"},
    401: {"model": ErrorOut, "description": "missing or unknown API key (Bearer)"},
    403: {"model": ErrorOut, "description": "the key's role may not do this"},
    404: {"model": ErrorOut, "description": "no job has this id"},
    409: {"model": ErrorOut, "description": "the job's status does not allow this"},
    413: {"model": ErrorOut, "description": "the body is too large"},
    503: {"model": ErrorOut, "description": "the store is unavailable; see Retry-After"},
}
