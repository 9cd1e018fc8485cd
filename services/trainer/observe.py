"""What a running job shows the operators: Prometheus metrics and a log line per epoch."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

from services.trainer.control import Metrics, StepInfo

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
