"""What a running job shows the operators: Prometheus metrics and a log line per epoch."""

from __future__ import annotations

import logging

from services.trainer.control import Metrics, StepInfo
from shared.metrics import EPOCHS, SAMPLES_PER_SECOND

log = logging.getLogger(__name__)


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
