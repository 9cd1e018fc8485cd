"""Whole services as real processes, for integration and end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from services.trainer.dataset import steps_per_epoch
from shared.settings import Settings

HEIMDALL = [sys.executable, "-m", "heimdall_cli.main"]
API = "/api/v1/training"
TERMINAL = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """The HEIMDALL_* environment that makes a process use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIMDALL_")}
    values = {
        "DATA_DIR": settings.data_dir,
        "DATABASE_URL": settings.database_url,
        "DATABASE_SCHEMA": settings.database_schema,
        "BROKER_URL": settings.broker_url,
        "EXCHANGE": settings.exchange,
        "WORK_QUEUE": settings.work_queue,
        "POLL_SECONDS": settings.poll_seconds,
        "LEASE_SECONDS": settings.lease_seconds,
        "ARTIFACTS_DIR": settings.artifacts,
        **{k.upper(): v for k, v in extra.items()},
    }
    env.update({f"HEIMDALL_{k}": str(v) for k, v in values.items() if v is not None})
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Service:
    """One `heimdall <command>` process whose output goes to a log file."""

    def __init__(self, command: str, env: dict[str, str], log_dir: Path, name: str) -> None:
        self.command, self.env, self.name = command, env, name
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*HEIMDALL, self.command], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up runs, as when a machine dies."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except (httpx.HTTPError, OSError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({last_error})")


def wait_healthy(client: httpx.Client, timeout: float = 60) -> None:
    wait_until(lambda: client.get("/health").status_code == 200, timeout, "the api's /health")


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"{API}/jobs/{job_id}").json()["job"]
    return body


def wait_job(
    client: httpx.Client,
    job_id: str,
    ready: Callable[[dict[str, Any]], Any],
    timeout: float,
    what: str,
) -> Any:
    """The job's read row once `ready(row)` holds."""

    def reached() -> dict[str, Any] | None:
        response = client.get(f"{API}/jobs/{job_id}")
        if response.status_code != 200:
            return None
        current: dict[str, Any] = response.json()["job"]
        return current if ready(current) else None

    return wait_until(reached, timeout, f"job {job_id}: {what}")


def wait_status(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float
) -> Any:
    return wait_job(client, job_id, lambda j: j["status"] in statuses, timeout, f"{statuses}")


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A job that trains for real in seconds on two CPU cores."""
    config: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 16,
        "accelerator": "cpu",
        "model_architecture": "convnext_atto",
        "dataset": {"samples": 128, "n_mels": 16, "frames": 16},
        "learning_rate": 0.002,
    }
    config.update(overrides)
    return config


# A job slow enough to be caught mid-epoch on two shared cores: about 40 steps an epoch.
LIVE_BATCH = 4
LIVE_CONFIG: dict[str, Any] = {
    "epochs": 2,
    "batch_size": LIVE_BATCH,
    "accelerator": "auto",
    "dataset": {"samples": 192, "n_mels": 16, "frames": 16},
}


def assert_live_progress(client: httpx.Client, timeout: float = 120) -> None:
    """Submit `LIVE_CONFIG` and check the running job's REST row: its device and the
    CPU warning from the claim on, then the live step, steps per epoch, samples/s, an ETA
    and the time of the last step; no progress once it has ended."""
    body = {"job_name": "live", "config": tiny_config(**LIVE_CONFIG)}
    created = client.post(f"{API}/jobs", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["parameter_count"] > 10**6
    assert created.json()["progress"] is None
    job_id = created.json()["id"]
    row = wait_job(client, job_id, lambda j: j["progress"] or j["status"] in TERMINAL, timeout,
                   "live progress")  # fmt: skip
    assert row["status"] == "running", row
    assert row["device"] == "cpu (fp32)"
    assert any("running on cpu (fp32)" in w for w in row["warnings"]), row["warnings"]
    live = row["progress"]
    events = client.get(f"{API}/jobs/{job_id}/events").json()["events"]
    started = next(e["data"] for e in events if e["kind"] == "Started")
    steps = steps_per_epoch(started["train_size"], LIVE_BATCH)
    assert live["steps_per_epoch"] == steps and steps > 20
    assert 1 <= live["step"] <= steps and live["epoch"] in (1, 2) and live["total_epochs"] == 2
    assert live["samples_per_second"] > 0 and live["eta_seconds"] is not None
    reported = datetime.fromisoformat(live["reported_at"])
    assert abs((datetime.now(UTC) - reported).total_seconds()) < 30
    listed = client.get(f"{API}/jobs", params={"status": "running"}).json()["jobs"]
    assert [j["progress"]["steps_per_epoch"] for j in listed if j["id"] == job_id] == [steps]
    done = wait_status(client, job_id, TERMINAL, timeout)
    assert done["status"] == "completed" and done["progress"] is None, done
