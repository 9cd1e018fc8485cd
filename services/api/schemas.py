"""The api's request and response bodies (the Heimdall frontend reads these names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.application import StoredJobEvent
from shared.bus import routing_key, websocket_event
from shared.config import JobConfig, SafeStr, SafeText
from shared.readmodel.shapes import JobView, MetricRow

__all__ = ["Job", "MetricRow"]


class SubmitJob(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    job_name: SafeStr = Field(min_length=1, max_length=200)
    description: SafeText = Field("", max_length=10_000)
    config: JobConfig = Field(default_factory=JobConfig)


Job = JobView


class CommandResult(JobView):
    """A command's answer: the job after it, as the Heimdall frontend reads it."""

    job_id: str = Field(description="the same as id")
    message: str = Field(description="what happened, for people")
    position: int = Field(description="store position of the command's last event")


class JobList(BaseModel):
    jobs: list[Job]
    total: int


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
    status: str = Field(description="the job's status after this event")

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
            status=stored.status,
        )


class EventPage(BaseModel):
    events: list[EventOut]
    last_position: int


class Health(BaseModel):
    status: str
    store: str
    read_store: str
    broker: str
    projection: str = Field(
        "ok", description="ok, or the position the projector is stuck on, since when, and why"
    )


class ErrorOut(BaseModel):
    detail: Any
    status: str | None = None
    errors: list[Any] | None = None
    position: int | None = Field(None, description="503: the store position to read after")
    stored: bool | None = Field(None, description="503: whether the command is stored")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body is not JSON"},
    401: {"model": ErrorOut, "description": "missing or unknown API key (Bearer)"},
    403: {"model": ErrorOut, "description": "the key's role may not do this"},
    404: {"model": ErrorOut, "description": "no job has this id"},
    409: {"model": ErrorOut, "description": "the job's status does not allow this"},
    413: {"model": ErrorOut, "description": "the body is too large"},
    503: {
        "model": ErrorOut,
        "description": "the store is unavailable, or the read tables have not reached the"
        " position yet; see Retry-After",
    },
}
