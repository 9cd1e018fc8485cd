"""Fills a store the honest way, fast: real aggregates saved in batches, then projected."""

from __future__ import annotations

import time
import uuid
from typing import Any

from services.projector.replay import rebuild
from shared.application import TrainingJobs
from shared.config import JobConfig
from shared.domainmodel import TrainingJob
from shared.readmodel.store import ReadStore

SAVE_BATCH = 500
WORKER = "bench-worker"


def config(epochs: int) -> dict[str, Any]:
    return JobConfig.model_validate({"epochs": epochs, "accelerator": "cpu"}).model_dump(
        mode="json"
    )


def add_jobs(app: TrainingJobs, n: int) -> list[uuid.UUID]:
    """`n` submitted jobs, every tenth cancelled at once; saved `SAVE_BATCH` at a time."""
    ids, cfg = [], config(10)
    for start in range(0, n, SAVE_BATCH):
        batch = []
        for i in range(start, min(n, start + SAVE_BATCH)):
            job = TrainingJob(
                id=uuid.uuid4(), job_name=f"bench-{i}", description="", config=cfg, actor="bench"
            )
            if i % 10 == 9:
                job.request_cancel("bench")
            batch.append(job)
        app.save(*batch)
        ids += [job.id for job in batch]
    return ids


def add_long_job(app: TrainingJobs, epochs: int) -> uuid.UUID:
    """One running job with `epochs` EpochCompleted events, as a trainer records them."""
    job = TrainingJob(
        id=uuid.uuid4(), job_name="bench-long", description="", config=config(epochs), actor="bench"
    )
    job.claim(WORKER, "cpu (fp32)", 1638, 410)
    app.save(job)
    for epoch in range(1, epochs + 1):
        job.complete_epoch(WORKER, job.attempt, epoch_metrics(epoch), is_best=epoch % 7 == 1)
        if epoch % SAVE_BATCH == 0 or epoch == epochs:
            app.save(job)
    return job.id


def epoch_metrics(epoch: int) -> dict[str, float | int | None]:
    decay = 1.0 / (1.0 + epoch / 50)
    return {
        "epoch": epoch,
        "train_loss": 1.5 * decay,
        "val_loss": 1.6 * decay,
        "train_accuracy": 1 - decay,
        "val_accuracy": 0.95 * (1 - decay),
        "learning_rate": 1e-3 * decay,
        "gradient_norm": 3.0 * decay,
        "val_distance_p50_m": 20_000 * decay,
        "val_distance_p95_m": 60_000 * decay,
        "val_rmse_m": 30_000 * decay,
        "epoch_seconds": 3.2,
        "samples_per_second": 510.0,
    }


def populate(app: TrainingJobs, reads: ReadStore, jobs: int, epochs: int) -> dict[str, Any]:
    """Store `jobs` jobs and one of `epochs` epochs, then project them all into `reads`."""
    started = time.perf_counter()
    add_jobs(app, jobs)
    long_job = add_long_job(app, epochs)
    saved = time.perf_counter()
    events = rebuild(app, reads, app.recorder.max_notification_id() or 0)
    return {
        "long_job": str(long_job),
        "events": events,
        "save_seconds": saved - started,
        "project_seconds": time.perf_counter() - saved,
    }
