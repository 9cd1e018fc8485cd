"""Settings from the environment (`HEIMDALL_` prefix), one class for every service."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_worker() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Where the store, the read tables, the broker and the artifacts live, and the limits."""

    model_config = SettingsConfigDict(env_prefix="HEIMDALL_", extra="ignore")

    database_url: str | None = Field(None, description="postgresql://...; SQLite when unset")
    database_schema: str = Field("public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    data_dir: Path = Path("var")
    artifacts_dir: Path | None = None
    broker_url: str | None = Field(None, description="amqp://...; in-process bus when unset")
    exchange: str = "heimdall.training"
    work_queue: str = "heimdall.training.work"
    api_host: str = "127.0.0.1"
    api_port: int = Field(8001, ge=1, le=65535)
    api_url: str = "http://127.0.0.1:8001"
    max_body_bytes: int = Field(1_000_000, ge=1024)
    poll_seconds: float = Field(0.2, gt=0)
    lease_seconds: float = Field(60.0, gt=0)
    worker_name: str = Field(default_factory=_default_worker)

    @property
    def artifacts(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def uses_postgres(self) -> bool:
        return bool(self.database_url)
