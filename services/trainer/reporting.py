"""What a running job reports, and to whom: its events to the store (`StoreHooks`, which
also obey pause, cancel and preemption), live step telemetry to the bus
(`StepTelemetry`), and Prometheus metrics and a log line per epoch to the operators."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from uuid import UUID

from prometheus_client import Counter, Gauge

from services.trainer.control import Checkpoint, Control, Metrics, StartInfo, StepInfo
from shared.application import TrainingJobs
from shared.bootstrap import UNREACHABLE
from shared.bus import Bus, Envelope
from shared.domainmodel import CANCELLING, PAUSING, TrainingJob
from shared.readmodel.shapes import StepProgress
from shared.waiting import durably

log = logging.getLogger(__name__)

# In the process registry: a trainer's `HEIMDALL_METRICS_PORT`, or the embedded api's /metrics.
SAMPLES_PER_SECOND = Gauge(
    "heimdall_trainer_samples_per_second", "Training throughput at the last step", ["worker"]
)
EPOCHS = Counter("heimdall_trainer_epochs", "Epochs completed by this trainer", ["worker"])
BUSY = Gauge("heimdall_trainer_busy", "1 while this trainer runs a job", ["worker"])
JOBS_RUN = Counter("heimdall_trainer_jobs", "Runs of jobs ended by this trainer", ["worker"])


def observe_step(worker: str, step: StepInfo) -> None:
    """After every step: cheap (a gauge set)."""
    SAMPLES_PER_SECOND.labels(worker).set(step.samples_per_second)


def observe_epoch(worker: str, metrics: Metrics) -> None:
    """The job id comes with the log line from the trainer's job context."""
    EPOCHS.labels(worker).inc()
    throughput = metrics.get("samples_per_second")
    if throughput is not None:
        SAMPLES_PER_SECOND.labels(worker).set(throughput)
    log.info(
        "epoch %s done: train_loss=%s val_loss=%s val_accuracy=%s, %s samples/s",
        metrics.get("epoch"),
        _short(metrics.get("train_loss")),
        _short(metrics.get("val_loss")),
        _short(metrics.get("val_accuracy")),
        _short(throughput),
    )


def _short(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.4g}"


INTERVAL_SECONDS = 1.0


class StepTelemetry:
    """Called on the training thread after every step; hands a message to the bus's loop.

    The per-step cost is one clock read and a comparison: the step's loss is read only
    for a message (on a GPU that read waits for the device). A message is handed over with
    `call_soon_threadsafe` and published by a task on the loop without the training
    thread waiting; if the loop is gone or the bus fails, the message is dropped.
    """

    def __init__(
        self,
        bus: Bus,
        loop: asyncio.AbstractEventLoop,
        job_id: str,
        worker: str,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus, self.loop, self.job_id, self.worker = bus, loop, job_id, worker
        self.interval, self.clock = interval, clock
        self._next = -math.inf
        self._total_epochs = 0
        self._started = clock()
        self._steps = 0  # steps this attempt has run
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, info: StartInfo) -> None:
        self._total_epochs = info.total_epochs
        self._started, self._steps = self.clock(), 0

    def __call__(self, step: StepInfo) -> None:
        self._steps += 1
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.interval
        envelope = Envelope.step(self.job_id, self.worker, self.data(step, now))
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self.loop.call_soon_threadsafe(self._publish, envelope)

    def data(self, step: StepInfo, now: float) -> dict[str, float | int | None]:
        """The message's `data`: a `StepProgress`."""
        progress = StepProgress(
            epoch=step.epoch,
            total_epochs=self._total_epochs or None,
            step=step.step,
            steps_per_epoch=step.steps_per_epoch,
            loss=step.loss if math.isfinite(step.loss) else None,
            samples_per_second=round(step.samples_per_second, 2),
            eta_seconds=self._eta(step, now),
        )
        return progress.model_dump()

    def _eta(self, step: StepInfo, now: float) -> float | None:
        """Steps left at this attempt's pace since its start (validations included), so
        the first step has one too."""
        done = (step.epoch - 1) * step.steps_per_epoch + step.step
        left = self._total_epochs * step.steps_per_epoch - done
        if self._steps <= 0 or self._total_epochs <= 0:
            return None
        return round(max(left, 0) * (now - self._started) / self._steps, 1)

    def _publish(self, envelope: Envelope) -> None:
        task = self.loop.create_task(self._send(envelope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, envelope: Envelope) -> None:
        try:
            await self.bus.publish_telemetry(envelope)
        except Exception as error:  # the bus is down: this step's telemetry is dropped
            log.debug("telemetry for %s dropped: %r", self.job_id, error)


CONFIRM_SECONDS = 2.0


class StoreHooks:
    """Writes each epoch and checkpoint to the job's stream; a lost claim stops the job.

    Pause and cancel are confirmed against the store: at once after a nudge from the
    bus, and every few seconds anyway, so a lost nudge only delays them.
    """

    def __init__(
        self,
        jobs: TrainingJobs,
        job_id: UUID,
        worker: str,
        attempt: int,
        patience_seconds: float = 60.0,
    ) -> None:
        self.jobs, self.job_id, self.worker, self.attempt = jobs, job_id, worker, attempt
        self.patience_seconds = patience_seconds
        self.active_at = time.monotonic()  # the last sign of life of the training thread
        # Stalls count only while steps run: data preparation, validation and the first
        # compiled step report no progress, and may take long without being stuck.
        self.in_steps = False
        self.nudged = threading.Event()
        self.preempting = threading.Event()  # the trainer is stopping: hand the job back
        self._confirmed_at = time.monotonic()
        self.last_step: StepInfo | None = None
        self.telemetry: StepTelemetry | None = None

    def on_start(self, info: StartInfo) -> None:
        self.active_at = time.monotonic()
        self.nudged.set()
        if self.telemetry is not None:
            self.telemetry.start(info)

    def check(self, step: StepInfo) -> Control:
        observe_step(self.worker, step)
        self.last_step, self.active_at = step, time.monotonic()
        self.in_steps = step.step < step.steps_per_epoch  # after the last: validation
        if self.telemetry is not None and not self.preempting.is_set():
            self.telemetry(step)
        return self.pending()

    def pending(self) -> Control:
        """A stop asked now: preemption, or a pause or cancel confirmed against the store
        (at once after a nudge, else every CONFIRM_SECONDS); ClaimLostError when the job
        is no longer this attempt's. Also asked while a group's nodes meet."""
        if self.preempting.is_set():
            return Control.PREEMPT
        due = time.monotonic() - self._confirmed_at > CONFIRM_SECONDS
        if not (due or self.nudged.is_set()):
            return Control.CONTINUE
        self.nudged.clear()
        self._confirmed_at = time.monotonic()
        try:
            job = self.jobs.get_job(self.job_id)
        except UNREACHABLE as error:  # train on; confirm again in a few seconds
            log.warning("job %s: cannot confirm against the store: %r", self.job_id, error)
            return Control.CONTINUE
        job.check_claim(self.worker, self.attempt)
        return {PAUSING: Control.PAUSE, CANCELLING: Control.CANCEL}.get(
            job.status, Control.CONTINUE
        )

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        """The epoch and its checkpoint (already on disk) in one transaction."""
        observe_epoch(self.worker, metrics)
        saved = (checkpoint.epoch, checkpoint.uri, checkpoint.sha256)
        self.record(
            f"epoch {metrics['epoch']}",
            lambda: self.jobs.record_epoch(
                self.job_id, self.worker, self.attempt, dict(metrics), is_best, saved
            ),
        )

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        self.record(
            f"checkpoint {epoch}",
            lambda: self.jobs.record_checkpoint(
                self.job_id, self.worker, self.attempt, epoch, uri, sha256
            ),
        )

    def record(self, what: str, use_case: Callable[[], TrainingJob]) -> TrainingJob:
        """Run one of the application's trainer use cases, riding out a store outage of up
        to `patience_seconds` (they are idempotent: a write that did land is not doubled)."""
        self.active_at = time.monotonic()
        return durably(
            f"job {self.job_id}: recording {what}", use_case, UNREACHABLE, self.patience_seconds
        )
