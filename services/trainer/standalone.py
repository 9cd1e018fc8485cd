"""Training without services: a job config file in, epochs printed, artifacts on disk."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from services.trainer.control import Checkpoint, Control, Metrics, Outcome, StartInfo, StepInfo
from services.trainer.job import run_training
from shared.config import JobConfig

LOSS_SECONDS = 1.0  # how often the bar reads a step's loss


class ConfigFileError(ValueError):
    """A job config file that cannot be read or is not a valid job config."""


def load_job_config(path: Path) -> JobConfig:
    """Read a YAML or JSON job config (JSON is YAML too) and validate it."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigFileError(f"{path}: cannot read ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: want a mapping of job config fields")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as error:
        problems = [
            f"  {'.'.join(str(part) for part in e['loc']) or '(config)'}: {e['msg']}"
            for e in error.errors()
        ]
        raise ConfigFileError(f"{path}: invalid job config\n" + "\n".join(problems)) from error


class ConsoleHooks:
    """Prints progress: a bar over each epoch's steps (on a terminal), each epoch's metrics
    once. Ctrl+C asks for a pause at the next step (a second one cancels)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.interrupts = 0
        self.total_epochs = 0
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task: TaskID | None = None
        self._next_loss, self._loss = 0.0, "-"

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1
        self.console.print("[yellow]pausing at the next step (Ctrl+C again cancels)[/]")

    def on_start(self, info: StartInfo) -> None:
        self.console.print(
            f"training on {info.device}: {info.train_size} train / {info.val_size} val samples, "
            f"{info.steps_per_epoch} steps per epoch, epochs {info.resumed_from_epoch + 1}"
            f"..{info.total_epochs}"
        )
        self.total_epochs = info.total_epochs
        epoch = f"{info.resumed_from_epoch + 1}/{info.total_epochs}"
        self.bar.start()
        self.task = self.bar.add_task("train", total=info.steps_per_epoch, epoch=epoch, loss="-")

    def check(self, step: StepInfo) -> Control:
        if self.task is not None:
            now = time.monotonic()
            if now >= self._next_loss:  # the loss read waits for a GPU: once a second
                self._loss, self._next_loss = _fmt(step.loss), now + LOSS_SECONDS
            epoch = f"{step.epoch}/{self.total_epochs}"
            self.bar.update(
                self.task, completed=step.step, total=step.steps_per_epoch, epoch=epoch,
                loss=self._loss,
            )  # fmt: skip
        if self.interrupts == 0:
            return Control.CONTINUE
        return Control.PAUSE if self.interrupts == 1 else Control.CANCEL

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k != "epoch")
        star = " [green]*best*[/]" if is_best else ""
        self.console.print(f"[bold]epoch {metrics['epoch']}[/]{star} {shown}")
        self.on_checkpoint(checkpoint.epoch, checkpoint.uri, checkpoint.sha256)
        if self.task is not None:
            epoch = f"{int(metrics['epoch'] or 0) + 1}/{self.total_epochs}"
            self.bar.reset(self.task, epoch=epoch, loss=self._loss)  # reset replaces fields

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        self.console.print(f"  checkpoint {uri} (sha256 {sha256[:12]})", style="dim")

    def close(self) -> None:
        """Take the bar away (it is drawn only on a terminal)."""
        self.bar.stop()


def _fmt(value: float | int | None) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def train_from_file(
    config_path: Path,
    artifacts_dir: Path,
    console: Console | None = None,
    resume_from: Path | None = None,
) -> Outcome:
    """`heimdall train CONFIG`: run the job in the foreground; ConfigFileError if invalid."""
    console = console or Console()
    config = load_job_config(config_path)
    hooks = ConsoleHooks(console)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, hooks.interrupt) if in_main else None
    try:
        outcome = run_training(config, artifacts_dir, hooks, resume_from)
    finally:
        hooks.close()
        if in_main:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)
    console.print(
        f"[bold]{outcome.kind}[/] after epoch {outcome.epoch}: "
        f"{outcome.model_uri or outcome.checkpoint_uri or 'nothing saved'}"
    )
    if outcome.kind == "paused":
        console.print(f"resume with --resume {outcome.checkpoint_uri}")
    return outcome
