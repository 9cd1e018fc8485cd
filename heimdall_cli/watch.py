"""`heimdall watch JOB`: a live progress bar fed by the job's WebSocket, reconnecting by itself."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus, WebSocketException

EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 3}
NOT_FOUND, BAD_REQUEST = 4404, 4400
MAX_DELAY_SECONDS = 5.0
MAX_FAILURES = 30


class WatchError(Exception):
    """The watch cannot go on: the job is unknown, or the api refuses us."""


def websocket_url(api_url: str, job_id: str, after: int | None) -> str:
    """`http(s)://host/prefix` → `ws(s)://host/prefix/ws/training/JOB[?after=N]`."""
    base = api_url.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    url = f"{base}/ws/training/{quote(job_id, safe='')}"
    return url if after is None else f"{url}?after={after}"


def auth_headers() -> dict[str, str]:
    key = os.environ.get("HEIMDALL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def duration(seconds: Any) -> str:
    """Seconds for people: `4m05s`, `2h07m`; nothing known is a dash."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class Watcher:
    """What is known of the job so far, shown on one progress bar."""

    def __init__(self, job_id: str, progress: Progress) -> None:
        self.job_id, self.progress = job_id, progress
        self.last: int | None = None
        self.received = 0
        self.status = "?"
        self.name, self.epochs, self.epoch = job_id, 0, 0.0
        self.running_epoch = 0  # the epoch shown: the one being trained, else the last one
        self.final: dict[str, Any] = {}
        self.waiting: str | None = None  # why a queued job has not started, as last said
        self.fields: dict[str, Any] = {
            "step": "-",
            "loss": "-",
            "speed": "-",
            "p50": "-",
            "eta": "-",
        }
        self.task: TaskID = progress.add_task(job_id, total=None, **self.fields)

    def handle(self, message: dict[str, Any]) -> None:
        event = message.get("event", "")
        self.received += 1
        if isinstance(message.get("position"), int):
            self.last = message["position"]
        if event == "training_status":
            self._status(message)
        elif event == "training_step":
            self._step(message["data"])
        elif event == "training_progress":
            self._epoch(message["data"])
        elif event == "error":
            self.progress.console.print(f"[yellow]server: {message.get('detail')}[/yellow]")
        if event != "training_status" and isinstance(message.get("position"), int):
            self.status = message.get("status", self.status)  # as the domain computed it
            self._ending(event, message.get("data") or {})
        if self.outcome() is not None:
            self._ended()
        self._show()

    def _ending(self, event: str, data: dict[str, Any]) -> None:
        """What the final line reports: the model of `Completed`, the error of `Failed`."""
        if event == "training_completed":
            self.final = {"model_uri": data.get("model_uri")}
        elif event == "training_failed":
            self.final = {"error": f"{data.get('error_type')}: {data.get('error')}"}
        elif self.status == "failed":  # the last attempt's trainer was lost
            self.final = {"error": f"WorkerLost: attempt {data.get('attempt')} lost"}

    def _ended(self) -> None:
        """The final state: no step in flight, nothing left to wait for; a completed job's
        bar is full."""
        self.fields.update(step="-", speed="-", eta="-")
        if self.status == "completed":
            self.epoch = self.running_epoch = self.epochs

    def _status(self, job: dict[str, Any]) -> None:
        self.name, self.status = job["job_name"], job["status"]
        self.epochs, self.epoch = job["total_epochs"], job["current_epoch"]
        self.running_epoch = job["current_epoch"]
        self.final = {"error": job.get("error_message"), "model_uri": job.get("model_path")}
        self.fields["loss"] = _number(job.get("val_loss"), ".4f")
        if job.get("progress"):  # a running job: where its trainer last said it was
            self._step(job["progress"])
        waiting = job.get("waiting")
        if waiting and waiting != self.waiting:
            self.progress.console.print(f"queued: {waiting}")
        self.waiting = waiting

    def _step(self, data: dict[str, Any]) -> None:
        self.epochs = data.get("total_epochs") or self.epochs
        self.epoch = data["epoch"] - 1 + data["step"] / max(data["steps_per_epoch"], 1)
        self.running_epoch = data["epoch"]
        self.fields["step"] = f"{data['step']}/{data['steps_per_epoch']}"
        self.fields["loss"] = _number(data.get("loss"), ".4f")
        self.fields["speed"] = _number(data.get("samples_per_second"), ".3g")
        self.fields["eta"] = duration(data.get("eta_seconds"))

    def _epoch(self, data: dict[str, Any]) -> None:
        metrics = data.get("metrics", {})
        self.epochs, self.epoch = data.get("total_epochs") or self.epochs, data["epoch"]
        self.running_epoch = data["epoch"]
        self.fields["p50"] = f"{_number(metrics.get('val_distance_p50_m'), '.0f')} m"
        self.progress.console.print(
            f"epoch {data['epoch']}/{self.epochs}: "
            f"train loss {_number(metrics.get('train_loss'), '.4f')}, "
            f"val loss {_number(metrics.get('val_loss'), '.4f')}, "
            f"val distance p50 {self.fields['p50']}, "
            f"p95 {_number(metrics.get('val_distance_p95_m'), '.0f')} m"
        )

    def _show(self) -> None:
        description = (
            f"{escape(self.name)} ({self.status}) epoch {self.running_epoch}/{self.epochs}"
        )
        total = self.epochs or None
        self.progress.update(
            self.task, description=description, total=total, completed=self.epoch, **self.fields
        )

    def outcome(self) -> int | None:
        """The exit code once the job has ended; None while it runs."""
        return EXIT_CODES.get(self.status)

    def verdict(self) -> str:
        if self.status == "completed":
            return f"job {self.job_id} completed; model: {self.final.get('model_uri')}"
        if self.status == "failed":
            return f"job {self.job_id} failed: {self.final.get('error')}"
        return f"job {self.job_id} was cancelled at epoch {self.running_epoch}"


async def follow(watcher: Watcher, api_url: str) -> int | None:
    """One connection: returns its close code (None if it could not connect)."""
    url = websocket_url(api_url, watcher.job_id, watcher.last)
    try:
        async with connect(url, additional_headers=auth_headers(), open_timeout=10) as socket:
            async for raw in socket:
                watcher.handle(json.loads(raw))
            return socket.close_code
    except ConnectionClosedError as closed:
        if closed.rcvd and closed.rcvd.code in (NOT_FOUND, BAD_REQUEST):
            raise WatchError(closed.rcvd.reason or f"closed with {closed.rcvd.code}") from None
        return closed.rcvd.code if closed.rcvd else None
    except InvalidStatus as refused:
        status = refused.response.status_code
        if status in (401, 403, 404):
            raise WatchError(f"the api refused the WebSocket: HTTP {status}") from None
        return None
    except (OSError, TimeoutError, WebSocketException):
        return None


async def watch(job_id: str, api_url: str, console: Console) -> int:
    """Follow a job until it ends; the exit code says how it ended."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("step {task.fields[step]}  loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} samples/s"),
        TextColumn("p50 {task.fields[p50]}  ETA {task.fields[eta]}"),
    )
    with Progress(*columns, console=console) as progress:
        watcher = Watcher(job_id, progress)
        await _follow_until_end(watcher, api_url)
    console.print(watcher.verdict())
    return EXIT_CODES[watcher.status]


async def _follow_until_end(watcher: Watcher, api_url: str) -> None:
    """Reconnect with `?after=<last position>` until the job has ended."""
    delay, failures = 0.5, 0
    while True:
        seen = watcher.received
        code = await follow(watcher, api_url)
        if watcher.outcome() is not None:
            return
        failures = 0 if watcher.received > seen else failures + 1
        if failures > MAX_FAILURES:
            raise WatchError(f"no answer from {api_url} after {failures} tries")
        delay = 0.5 if failures == 0 else min(delay * 2, MAX_DELAY_SECONDS)
        reason = "closed" if code is None else f"closed ({code})"
        watcher.progress.console.print(f"[yellow]{reason}; reconnecting in {delay:.1f}s[/yellow]")
        await asyncio.sleep(delay)
