"""What the default job learns: its validation errors against three baselines on its split.

Runs the default JobConfig on the CPU (`run_training`, as a trainer would, export
included) and measures, on the same validation split, predicting the region's centre,
the power-weighted centroid of the receivers and a kNN on the per-receiver powers
(services/trainer/baselines.py). Distances are great-circle km at p50/p68/p95; the
model's are the last epoch's and the shipped model's (`model.pt`, the best epoch by
validation loss). Figures, not a timed test; `--quick` runs a smaller job.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from bench.common import Result, emit, parser, workdir
from services.trainer.baselines import baseline_metrics
from services.trainer.control import Checkpoint, Metrics, NullHooks
from services.trainer.dataset import load_dataset, split_indices
from services.trainer.job import run_training
from shared.config import JobConfig

QUICK = {"epochs": 3, "dataset": {"samples": 512, "n_mels": 32, "frames": 16}}
QUANTILES = ("p50", "p68", "p95")


class _Epochs(NullHooks):
    def __init__(self) -> None:
        self.metrics: list[Metrics] = []

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self.metrics.append(metrics)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _model_row(metrics: Metrics) -> dict[str, Any]:
    row = {q: float(metrics[f"val_distance_{q}_m"] or 0) / 1000 for q in QUANTILES}
    return row | {"inside_68": metrics["val_inside_68"], "epoch": metrics["epoch"]}


def measure(config: JobConfig) -> Result:
    """The job's and the baselines' p50/p68/p95 (km) and wall/CPU seconds."""
    data = load_dataset(config.dataset)
    split = split_indices(len(data.positions), config.validation_split, config.seed)
    started = time.perf_counter()
    found = baseline_metrics(data, *split)
    baseline_s = time.perf_counter() - started
    rows: dict[str, Any] = {
        name: {q: row[f"{q}_m"] / 1000 for q in QUANTILES} | {"seconds": baseline_s}
        for name, row in found.items()
    }
    hooks = _Epochs()
    with workdir() as folder:
        cpu, started = _cpu_seconds(), time.perf_counter()
        outcome = run_training(config, folder, hooks)
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    best = hooks.metrics[(outcome.best_epoch or len(hooks.metrics)) - 1]
    rows["job_last_epoch"] = _model_row(hooks.metrics[-1]) | {"seconds": wall, "cpu": cpu}
    rows["job_shipped"] = _model_row(best) | {"seconds": wall, "cpu": cpu}
    knn_p50 = rows["knn"]["p50"]
    return {
        "config": config.model_dump(mode="json"),
        "rows": rows,
        "last_over_knn_p50": rows["job_last_epoch"]["p50"] / knn_p50,
        "shipped_over_knn_p50": rows["job_shipped"]["p50"] / knn_p50,
    }


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    config = JobConfig.model_validate({"accelerator": "cpu", **(QUICK if args.quick else {})})
    emit(measure(config), args.json)


if __name__ == "__main__":
    main()
