"""Settings from the environment (`HEIMDALL_` prefix), one class for every service."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.security import ApiKey, ConfigurationError, parse_api_keys, parse_origins

DEFAULT_SUBMIT_BATCH = 64


def _default_worker() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _default_log_format() -> Literal["json", "text"]:
    """Text for a person at a terminal, JSON lines for a collector."""
    stderr = sys.stderr
    return "text" if stderr is not None and stderr.isatty() else "json"


def connectable_host(host: str) -> str:
    """The address a client uses to reach a server listening on `host` (a wildcard means
    this machine; an IPv6 address goes in brackets)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


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
    api_url: str = Field(
        "", description="where the CLI finds the api; unset: http://API_HOST:API_PORT"
    )
    max_body_bytes: int = Field(1_000_000, ge=1024)
    ws_queue: int = Field(1000, ge=1, description="messages a WebSocket client may lag behind")
    poll_seconds: float = Field(0.2, gt=0)
    submit_batch: int = Field(
        DEFAULT_SUBMIT_BATCH,
        ge=1,
        le=1000,
        description="new jobs saved in one transaction at most; 1: each alone",
    )
    max_dataset_bytes: int = Field(
        4 * 2**30,
        ge=1,
        description="a job's float32 inputs must fit in this many bytes; larger jobs are"
        " refused at submit",
    )
    read_wait_seconds: float = Field(
        5.0,
        gt=0,
        le=60,
        description="how long a command answer (or a query naming a position) waits for the"
        " read tables to show it; then 503",
    )
    lease_seconds: float = Field(60.0, gt=0)
    stall_seconds: float = Field(
        900.0, gt=0, description="a training thread silent this long is treated as hung"
    )
    worker_name: str = Field(default_factory=_default_worker)
    trainer_kind: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="the work a trainer takes: gpu (jobs asking for a GPU, and auto ones),"
        " cpu (jobs asking for the CPU, and auto ones); auto: gpu where CUDA sees a device",
    )
    sweep_seconds: float = Field(
        30.0,
        ge=0.1,
        description="how often the projector looks for runnable jobs whose work message"
        " is missing, and how long a job must have waited to count",
    )
    rank_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="intra-op threads of each CPU rank of a torchrun group; unset: the"
        " host's CPUs shared among the group's ranks on it",
    )
    rendezvous_host: str = Field(
        "127.0.0.1",
        description="the address other trainers reach this one at, for the c10d rendezvous"
        " of a job whose nodes is above 1",
    )
    rendezvous_seconds: float = Field(
        600.0, gt=0, description="how long a multi-node group waits for all its nodes"
    )
    # Security and observability (README: Security and Observability).
    api_keys: Annotated[tuple[ApiKey, ...], NoDecode] = Field(
        (), description="name:KEY:role,... (viewer|operator); without keys: loopback only"
    )
    api_key: SecretStr | None = Field(None, description="the key the CLI sends as Bearer")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    cors_allow_credentials: bool = False
    ws_clients_per_key: int = Field(100, ge=1)
    ws_max_message_bytes: int = Field(65_536, ge=256)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_format: Literal["json", "text"] = Field(default_factory=_default_log_format)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, raw: object) -> tuple[ApiKey, ...]:
        return parse_api_keys(raw)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _cors_origins(cls, raw: object) -> tuple[str, ...]:
        return parse_origins(raw)

    @model_validator(mode="after")
    def _api_url_from_host_and_port(self) -> Self:
        if not self.api_url:
            self.api_url = f"http://{connectable_host(self.api_host)}:{self.api_port}"
        return self

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Self:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "HEIMDALL_CORS_ORIGINS='*' together with HEIMDALL_CORS_ALLOW_CREDENTIALS=true"
                " would let any site act with a user's credentials: list the origins instead"
            )
        return self

    @property
    def artifacts(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def uses_postgres(self) -> bool:
        return bool(self.database_url)


def load_settings() -> Settings:
    """The environment's settings; a bad one is a ConfigurationError naming its variable.

    The message leaves out the offending value: it may be an API key.
    """
    try:
        return Settings()
    except ValidationError as error:
        lines = [
            f"{'HEIMDALL_' + str(e['loc'][0]).upper() if e['loc'] else 'settings'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        ]
        raise ConfigurationError("invalid configuration: " + "; ".join(lines)) from None
