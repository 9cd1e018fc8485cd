"""The hooks a trainer gives a running job: record what happens, obey pause and cancel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from uuid import UUID

from services.trainer.control import Checkpoint, Control, Metrics, StartInfo, StepInfo
from services.trainer.observe import observe_epoch, observe_step
from services.trainer.telemetry import StepTelemetry
from shared.application import TrainingJobs
from shared.bootstrap import UNREACHABLE
from shared.domainmodel import CANCELLING, PAUSING, TrainingJob
from shared.waiting import durably

log = logging.getLogger(__name__)
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
        if self.preempting.is_set():
            return Control.PREEMPT
        if self.telemetry is not None:
            self.telemetry(step)
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
