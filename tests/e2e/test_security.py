"""The real processes: refusing to start exposed, keys over HTTP and the CLI, JSON logs, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from shared.settings import Settings
from tests.processes import (
    API,
    HEIMDALL,
    Service,
    free_port,
    settings_env,
    tiny_config,
    wait_healthy,
    wait_status,
)

OPERATOR = "op-" + uuid.uuid4().hex
VIEWER = "view-" + uuid.uuid4().hex
KEYS = f"ci:{OPERATOR}:operator,grafana:{VIEWER}:viewer"
CAP, LIMIT = 2, 512


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEIMDALL, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_api_refuses_a_public_host_without_keys(tmp_path: Path) -> None:
    env = settings_env(Settings(data_dir=tmp_path / "var"), api_host="0.0.0.0")
    done = run("api", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert line["level"] == "CRITICAL"
    assert "refusing to listen on 0.0.0.0" in line["message"]
    assert "HEIMDALL_API_KEYS" in line["message"]
    assert "Traceback" not in done.stderr


def test_a_malformed_key_entry_exits_2_naming_it(tmp_path: Path) -> None:
    env = settings_env(Settings(data_dir=tmp_path / "var"), api_keys="ok:short:operator")
    done = run("up", env=env)
    assert done.returncode == 2
    assert "HEIMDALL_API_KEYS: entry 1 ('ok'): the key must be" in done.stderr
    assert "Traceback" not in done.stderr


@dataclass
class Secured:
    client: httpx.Client
    service: Service
    env: dict[str, str]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "var", poll_seconds=0.05)
    env = settings_env(
        settings,
        api_port=port,
        api_keys=KEYS,
        log_format="json",
        ws_clients_per_key=CAP,
        ws_max_message_bytes=LIMIT,
    )
    service = Service("up", env, tmp_path, "up").start()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {VIEWER}"}
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("HEIMDALL_")}
    cli_env["HEIMDALL_API_URL"] = base
    with httpx.Client(base_url=base, timeout=10, headers=headers) as client:
        try:
            wait_healthy(client)
            yield Secured(client, service, cli_env)
        finally:
            service.stop()


def test_keys_roles_logs_and_metrics_of_a_real_run(secured: Secured, tmp_path: Path) -> None:
    config = tmp_path / "job.json"
    config.write_text(json.dumps(tiny_config(epochs=2)))
    anonymous = run("submit", str(config), env=secured.env)
    assert anonymous.returncode == 1 and "401" in anonymous.stdout
    assert "HEIMDALL_API_KEY" in anonymous.stdout
    submitted = run("submit", str(config), env={**secured.env, "HEIMDALL_API_KEY": OPERATOR})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split()[1]
    viewer = run("cancel", job_id, env={**secured.env, "HEIMDALL_API_KEY": VIEWER})
    assert viewer.returncode == 1 and "403" in viewer.stdout and "operator" in viewer.stdout
    done = wait_status(secured.client, job_id, ("completed", "failed"), timeout=180)
    assert done["status"] == "completed", done
    events = secured.client.get(f"{API}/jobs/{job_id}/events").json()["events"]
    assert events[0]["actor"] == "ci"

    samples = scrape(secured.client)
    assert samples[("heimdall_jobs", (("status", "completed"),))] == 1
    assert samples[("heimdall_events_projected_total", ())] >= len(events)
    assert samples[("heimdall_trainer_samples_per_second", (("worker", worker(events)),))] > 0
    assert samples[("heimdall_projector_lag_events", ())] == 0

    secured.service.stop()
    assert_json_lines_name_the_job(secured.service.log(), job_id)


def worker(events: list[dict[str, Any]]) -> str:
    return str(next(e["actor"] for e in events if e["kind"] == "Started"))


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{client.base_url}/metrics", timeout=10).text  # open: no key
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def assert_json_lines_name_the_job(output: str, job_id: str) -> None:
    """Every line is one JSON object; every line about the job carries its id."""
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about = [line for line in lines if job_id in line["message"]]
    assert about, "no log line mentions the job"
    assert all(line.get("job_id") == job_id for line in about), about
    tagged = [line for line in lines if line.get("job_id") == job_id]
    loggers = {line["logger"] for line in tagged}
    assert {"uvicorn.access", "services.trainer.worker"} <= loggers, loggers
    assert any("epoch" in line["message"] for line in tagged), "no epoch line has the job id"


async def closed_at_once(url: str) -> tuple[int | None, str | None]:
    """A socket the server closes before sending anything: its close code and reason."""
    async with connect(url, open_timeout=10) as socket:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 10)
        return socket.close_code, socket.close_reason


async def test_sockets_need_a_key_are_capped_per_key_and_limit_messages(
    secured: Secured,
) -> None:
    base = str(secured.client.base_url).replace("http://", "ws://").rstrip("/") + "/ws/training"
    assert await closed_at_once(base) == (4401, "missing or unknown API key")
    assert (await closed_at_once(f"{base}?token=nope-{VIEWER}"))[0] == 4401
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    async with (
        connect(base, additional_headers=headers) as a,
        connect(f"{base}?token={OPERATOR}") as b,
    ):
        for socket in (a, b):
            assert json.loads(await socket.recv())["event"] == "connected"
        code, reason = await closed_at_once(f"{base}?token={OPERATOR}")
        assert code == 4429 and f"'ci' (at most {CAP})" in str(reason)
        async with connect(f"{base}?token={VIEWER}") as other:
            assert json.loads(await other.recv())["event"] == "connected"
        await a.send(json.dumps({"event": "ping", "pad": "x" * LIMIT}))
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(a.recv(), 10)
        assert a.close_code == 1009
    async with connect(f"{base}?token={OPERATOR}") as again:
        assert json.loads(await again.recv())["event"] == "connected"
