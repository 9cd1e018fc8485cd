"""Live step telemetry: at most one message a second per job, never waited for, never stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from services.trainer.control import StartInfo, StepInfo
from shared.bus import Bus, Envelope
from shared.readmodel.shapes import StepProgress

log = logging.getLogger(__name__)
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
