"""`heimdall watch`: the WebSocket URL, the auth header and how messages become an outcome."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from heimdall_cli.watch import Watcher, auth_headers, websocket_url

JOB = "0b7a3c2e-3f0e-4c55-9a39-8d1f6f0a8f41"


@pytest.mark.parametrize(
    ("api_url", "after", "expected"),
    [
        ("http://127.0.0.1:8001", None, f"ws://127.0.0.1:8001/ws/training/{JOB}"),
        ("https://h.example/heimdall/", 41, f"wss://h.example/heimdall/ws/training/{JOB}?after=41"),
    ],
)
def test_the_websocket_url_derives_from_the_api_url(
    api_url: str, after: int | None, expected: str
) -> None:
    assert websocket_url(api_url, JOB, after) == expected


def test_the_api_key_goes_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEIMDALL_API_KEY", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("HEIMDALL_API_KEY", "s3cret")
    assert auth_headers() == {"Authorization": "Bearer s3cret"}


def status(**fields: Any) -> dict[str, Any]:
    job = {"id": JOB, "job_name": "n", "status": "running", "total_epochs": 3}
    job.update(current_epoch=1, val_loss=0.5, error_message=None, model_path=None)
    return {"event": "training_status", **job, **fields}


def test_messages_move_the_bar_and_the_last_position_and_decide_the_exit_code() -> None:
    with Progress(console=Console(quiet=True)) as progress:
        watcher = Watcher(JOB, progress)
        watcher.handle(status())
        assert watcher.outcome() is None and watcher.last is None
        step = {"epoch": 2, "step": 5, "steps_per_epoch": 10, "loss": 0.25, "eta_seconds": 75}
        watcher.handle({"event": "training_step", "job_id": JOB, "data": step})
        assert watcher.epoch == 1.5 and watcher.fields["eta"] == "1m15s"
        metrics = {"val_loss": 0.2, "val_distance_p50_m": 1234.4}
        epoch = {"epoch": 2, "total_epochs": 3, "metrics": metrics}
        progress_message = {"event": "training_progress", "position": 9, "data": epoch}
        watcher.handle({**progress_message, "status": "running"})
        assert watcher.last == 9 and watcher.fields["p50"] == "1234 m"
        failed = {"error": "CUDA out of memory", "error_type": "RuntimeError"}
        watcher.handle(
            {"event": "training_failed", "position": 12, "status": "failed", "data": failed}
        )
    assert watcher.outcome() == 1 and watcher.last == 12
    assert "CUDA out of memory" in watcher.verdict()


@pytest.mark.parametrize(("final", "code"), [("completed", 0), ("failed", 1), ("cancelled", 3)])
def test_a_job_that_had_already_ended_is_known_from_its_status(final: str, code: int) -> None:
    with Progress(console=Console(quiet=True)) as progress:
        watcher = Watcher(JOB, progress)
        watcher.handle(status(status=final))
    assert watcher.outcome() == code


def test_the_bar_names_the_running_epoch_and_ends_on_the_final_state() -> None:
    """During epoch 2 (one epoch recorded) the bar says epoch 2, with samples/s; after the
    end it holds no stale step or ETA, and a completed job's bar is full."""
    with Progress(console=Console(quiet=True)) as progress:
        watcher = Watcher(JOB, progress)
        watcher.handle(status())
        step = {"epoch": 2, "step": 9, "steps_per_epoch": 12, "loss": 0.25, "eta_seconds": 3}
        watcher.handle(
            {"event": "training_step", "job_id": JOB, "data": step | {"samples_per_second": 0.76}}
        )
        task = progress.tasks[0]
        assert "epoch 2/3" in task.description and watcher.fields["speed"] == "0.76"
        done = {"model_uri": "m.pt"}
        watcher.handle(
            {"event": "training_completed", "position": 20, "status": "completed", "data": done}
        )
        task = progress.tasks[0]
    assert "(completed) epoch 3/3" in task.description and task.completed == task.total == 3
    assert (watcher.fields["step"], watcher.fields["eta"], watcher.fields["speed"]) == ("-",) * 3


def test_a_queued_job_says_once_why_it_waits() -> None:
    console = Console(record=True, width=200)
    reason = "no connected trainer takes jobs that need a GPU (accelerator: gpu)"
    with Progress(console=console) as progress:
        watcher = Watcher(JOB, progress)
        watcher.handle(status(status="queued", waiting=reason))
        watcher.handle(status(status="queued", waiting=reason))
    assert console.export_text().count(f"queued: {reason}") == 1
