"""The hooks a trainer gives a running job: record what happens, obey pause and cancel."""

from __future__ import annotations

import threading
import time
from uuid import UUID

from services.trainer.control import Control, Metrics, StartInfo, StepInfo
from services.trainer.telemetry import StepTelemetry
from shared.application import TrainingJobs
from shared.domainmodel import CANCELLING, PAUSING

CONFIRM_SECONDS = 2.0


class StoreHooks:
    """Writes each epoch and checkpoint to the job's stream; a lost claim stops the job.

    Pause and cancel are confirmed against the store: at once after a nudge from the
    bus, and every few seconds anyway, so a lost nudge only delays them.
    """

    def __init__(self, jobs: TrainingJobs, job_id: UUID, worker: str, attempt: int) -> None:
        self.jobs, self.job_id, self.worker, self.attempt = jobs, job_id, worker, attempt
        self.nudged = threading.Event()
        self._confirmed_at = time.monotonic()
        self.last_step: StepInfo | None = None
        self.telemetry: StepTelemetry | None = None

    def on_start(self, info: StartInfo) -> None:
        self.nudged.set()
        if self.telemetry is not None:
            self.telemetry.start(info)

    def check(self, step: StepInfo) -> Control:
        self.last_step = step
        if self.telemetry is not None:
            self.telemetry(step)
        due = time.monotonic() - self._confirmed_at > CONFIRM_SECONDS
        if not (due or self.nudged.is_set()):
            return Control.CONTINUE
        self.nudged.clear()
        self._confirmed_at = time.monotonic()
        job = self.jobs.get_job(self.job_id)
        job.check_claim(self.worker, self.attempt)
        return {PAUSING: Control.PAUSE, CANCELLING: Control.CANCEL}.get(
            job.status, Control.CONTINUE
        )

    def on_epoch(self, metrics: Metrics, is_best: bool) -> None:
        self.jobs.change(
            self.job_id,
            lambda job: job.complete_epoch(self.worker, self.attempt, dict(metrics), is_best),
        )

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        self.jobs.change(
            self.job_id,
            lambda job: job.save_checkpoint(self.worker, self.attempt, epoch, uri, sha256),
        )
