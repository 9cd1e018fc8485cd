"""The CLI finds the api as the server was told, and says in one line when it cannot."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from heimdall_cli import main
from shared.settings import Settings

runner = CliRunner()
JOB_ID = "6c50db5f-26ee-545e-a192-ac50bd44642e"
UNREACHABLE = 3


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEIMDALL_API_URL", "HEIMDALL_API_HOST", "HEIMDALL_API_PORT", "HEIMDALL_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def closed_port() -> int:
    """A port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def one_line(result: Result, code: int, *words: str) -> str:
    """Exit `code` with one line on stderr naming `words`, and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heimdall: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "http://127.0.0.1:8001"),
        ({"HEIMDALL_API_PORT": "8002"}, "http://127.0.0.1:8002"),
        ({"HEIMDALL_API_HOST": "10.1.2.3", "HEIMDALL_API_PORT": "9000"}, "http://10.1.2.3:9000"),
        ({"HEIMDALL_API_HOST": "0.0.0.0"}, "http://127.0.0.1:8001"),
        ({"HEIMDALL_API_HOST": "::"}, "http://[::1]:8001"),
        ({"HEIMDALL_API_HOST": "fd00::7"}, "http://[fd00::7]:8001"),
        (
            {"HEIMDALL_API_URL": "https://h.example/heimdall", "HEIMDALL_API_PORT": "8002"},
            "https://h.example/heimdall",
        ),
    ],
)
def test_the_cli_url_follows_the_servers_host_and_port_unless_given(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None).api_url == expected


def api_commands(tmp_path: Path) -> list[tuple[str, ...]]:
    return [
        ("submit", "--name", "x"),
        ("jobs",),
        ("metrics", JOB_ID),
        ("pause", JOB_ID),
        ("resume", JOB_ID),
        ("cancel", JOB_ID),
        ("audit", JOB_ID),
        ("watch", JOB_ID),
        ("export", JOB_ID, "-o", str(tmp_path / "job.heimdall")),
    ]


@pytest.mark.parametrize("by", ["url", "port"])
def test_every_command_says_in_one_line_that_the_api_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, by: str
) -> None:
    port = closed_port()
    if by == "url":
        monkeypatch.setenv("HEIMDALL_API_URL", f"http://127.0.0.1:{port}")
    else:
        monkeypatch.setenv("HEIMDALL_API_PORT", str(port))
    for command in api_commands(tmp_path):
        result = runner.invoke(main.app, list(command))
        line = one_line(result, UNREACHABLE, f"http://127.0.0.1:{port}")
        assert "cannot reach the api" in line, (command, line)
    assert not (tmp_path / "job.heimdall").exists()


def answering(monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], Any]) -> None:
    """Every ApiClient talks to `handler` instead of the network."""
    real = httpx.Client

    def fake(**kwargs: Any) -> httpx.Client:
        return real(transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(httpx, "Client", fake)


JOB = {
    "id": JOB_ID,
    "job_name": "demo",
    "status": "running",
    "current_epoch": 2,
    "total_epochs": 10,
    "val_loss": -0.12345678901234568,
    "model_architecture": "convnext_atto",
    "created_at": "2026-11-28T18:22:08.678375+00:00",
}


def test_jobs_shows_numbers_and_times_for_people(monkeypatch: pytest.MonkeyPatch) -> None:
    page = {"jobs": [JOB, {**JOB, "id": JOB_ID[:-1] + "f", "val_loss": None}], "total": 2}
    answering(monkeypatch, lambda _: httpx.Response(200, json=page))
    monkeypatch.setattr(main, "console", Console(width=200))
    result = runner.invoke(main.app, ["jobs"])
    assert result.exit_code == 0, result.output
    assert "-0.1235" in result.stdout and "0.12345678" not in result.stdout, result.stdout
    assert "None" not in result.stdout, result.stdout
    assert "2026-11-28 18:22:08" in result.stdout and ".678375" not in result.stdout
    assert "2/10" in result.stdout and "2 jobs" in result.stdout


def test_jobs_shows_a_running_jobs_live_progress_as_the_api_gives_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The step, samples/s, ETA and device of `GET /jobs`; a name with markup stays as is."""
    progress = {
        "epoch": 2, "total_epochs": 10, "step": 37, "steps_per_epoch": 102, "loss": 0.41,
        "samples_per_second": 0.76, "eta_seconds": 7385.0,
        "reported_at": "2026-11-28T18:22:08+00:00",
    }  # fmt: skip
    running = {**JOB, "job_name": "[bold]x[/bold]", "current_epoch": 1, "progress": progress,
               "device": "cpu (fp32)"}  # fmt: skip
    answering(monkeypatch, lambda _: httpx.Response(200, json={"jobs": [running], "total": 1}))
    monkeypatch.setattr(main, "console", Console(width=250))
    result = runner.invoke(main.app, ["jobs"])
    assert result.exit_code == 0, result.output
    for shown in ("37/102", "0.76", "2h03m", "cpu (fp32)", "[bold]x[/bold]", "2/10"):
        assert shown in result.stdout, (shown, result.stdout)  # epoch 2 runs: not 1/10
    monkeypatch.setattr(main, "console", Console(width=80))
    narrow = runner.invoke(main.app, ["jobs"])
    assert JOB_ID in narrow.stdout and "1 of 1 jobs" in narrow.stdout, narrow.stdout


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (
            409,
            {"detail": "cannot pause a job that is completed", "status": "completed"},
            ("error 409: cannot pause a job that is completed",),
        ),
        (503, {"detail": {"store": "down", "retry": 5}}, ("error 503", "store: down")),
        (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", ("error 502", "Bad Gateway")),
        (500, ["not", "an", "object"], ("error 500", "Internal Server Error")),
        (404, {"detail": "job [bold]x[/bold] not found"}, ("job [bold]x[/bold] not found",)),
    ],
)
def test_an_api_error_is_its_message_in_one_line(
    monkeypatch: pytest.MonkeyPatch, status: int, body: Any, words: tuple[str, ...]
) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers={"Content-Type": "text/html"})
        return httpx.Response(status, json=body)

    answering(monkeypatch, handler)
    result = runner.invoke(main.app, ["pause", JOB_ID])
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error "), result.stdout
    assert "{'" not in lines[0] and "<html" not in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_metrics_reads_at_80_columns_a_row_per_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    """28 metrics as columns were cut to nothing at 80 columns; now a row each, whole."""
    from shared.readmodel.shapes import MetricRow

    row = dict.fromkeys(MetricRow.model_fields, 21782.123)
    rows = [row | {"epoch": e, "val_inside_68": 0.7292} for e in range(1, 11)]
    answering(monkeypatch, lambda _: httpx.Response(200, json=rows))
    monkeypatch.setattr(main, "console", Console(width=80))
    result = runner.invoke(main.app, ["metrics", JOB_ID])
    assert result.exit_code == 0, result.output
    for name in ("uncertainty_calibration_error", "baseline_knn_p95_m", "epoch 10", "0.7292"):
        assert name in result.stdout, (name, result.stdout)
    assert "21782 " in result.stdout and "…" not in result.stdout
    assert "the last 4 of 10 epochs" in result.stdout and "epoch 6 " not in result.stdout
