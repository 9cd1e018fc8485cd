"""Figure 1: samples/s of a job trained through the trainer service vs a bare PyTorch loop.

The system side is the real path: a job submitted to a PostgreSQL store, projected,
claimed by `services.trainer.worker.Trainer` and run by `run_training` with the real
`StoreHooks` (a control check after every step, epoch events, checkpoints, the lease).
The bare side trains the same model on the same data, batch size and seed in a plain
loop. Each run is its own process (so peak memory is its own); runs alternate.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.bare_loop import StepClock, train_bare
from bench.common import (
    DATABASE_URL,
    Result,
    alternate,
    emit,
    fresh_schema,
    median,
    own_peak_rss_mb,
    parser,
    ratio,
    run_child,
    workdir,
)
from shared.config import JobConfig

GOAL = 0.98


def job_config(quick: bool) -> JobConfig:
    samples = 320 if quick else 2048  # 2048: the default dataset's size
    return JobConfig.model_validate(
        {
            "epochs": 2,
            "batch_size": 32,
            "accelerator": "cpu",
            "model_architecture": "convnext_atto",
            "validation_split": 0.2,
            "dataset": {"kind": "synthetic", "samples": samples, "n_mels": 64, "frames": 32},
        }
    )


def trained_samples(config: JobConfig) -> int:
    from services.trainer.worker import dataset_sizes

    train, _ = dataset_sizes(config)
    return config.epochs * (train // min(config.batch_size, train)) * config.batch_size


def run_system(config: JobConfig) -> Result:
    """Submit, project, claim and train through the trainer service; time the whole job."""
    from services.projector.runner import Projector
    from services.trainer.worker import build_trainer
    from shared.bootstrap import build_app, build_read_store
    from shared.bus import InProcessBus
    from shared.settings import Settings

    with fresh_schema("bench_trainer") as schema, workdir() as tmp:
        settings = Settings(database_url=DATABASE_URL, database_schema=schema, data_dir=tmp)
        jobs, reads, bus = build_app(settings), build_read_store(settings), InProcessBus()
        trainer = build_trainer(settings, jobs, reads, bus)
        job = jobs.submit("bench", "", config.model_dump(mode="json"), "bench").job

        async def main() -> tuple[float, float]:
            await Projector(jobs, reads, InProcessBus()).catch_up()  # the row, no message
            started, cpu = time.perf_counter(), time.process_time()
            if not await trainer.run_next():
                raise RuntimeError("the trainer found no runnable job")
            return time.perf_counter() - started, time.process_time() - cpu

        seconds, cpu_seconds = asyncio.run(main())
        status = jobs.get_job(job.id).status
        history = jobs.history(job.id)
        reads.close()
    if status != "completed":
        raise RuntimeError(f"bench job ended {status}, not completed")
    epochs = [e.data["metrics"] for e in history if e.kind == "EpochCompleted"]
    step_seconds = sum(
        trained_samples(config) / len(epochs) / m["samples_per_second"] for m in epochs
    )
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "events": len(history),
        "step_seconds": step_seconds,
    }


def run_bare(config: JobConfig) -> Result:
    """The same model, data, batch size and seed in a plain PyTorch loop."""
    clock = StepClock()
    with workdir() as tmp:
        cpu = time.process_time()
        seconds = train_bare(config, tmp, torch.device("cpu"), clock=clock)
        cpu_seconds = time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "step_seconds": sum(clock.steps)}


def child(mode: str, quick: bool) -> None:
    config = job_config(quick)
    result = run_system(config) if mode == "system" else run_bare(config)
    samples = trained_samples(config)
    result |= {
        "mode": mode,
        "samples": samples,
        "samples_per_second": samples / result["seconds"],
        "samples_per_cpu_second": samples / result["cpu_seconds"],
        "step_samples_per_second": samples / result["step_seconds"],
        "peak_rss_mb": own_peak_rss_mb(),
    }
    print(json.dumps(result))


def main(rounds: int, quick: bool, out: Path | None) -> None:
    """Alternate bare and system runs (ABBA...) so drift in the machine's load hits both."""

    def run(mode: str) -> Result:
        last = run_child("bench.trainer", mode, quick, 600)
        print(
            f"{mode}: {last['samples_per_second']:.1f} samples/s,"
            f" {last['samples_per_cpu_second']:.1f} per CPU second",
            flush=True,
        )
        return last

    runs = alternate(rounds, run)
    figures = {m: _figures(rs) for m, rs in runs.items()}
    config = job_config(quick)
    emit(
        {
            "figure": "trainer",
            "config": {
                "model": config.model_architecture,
                "batch_size": config.batch_size,
                "epochs": config.epochs,
                "samples": trained_samples(config),
                "input": [7, 64, 32],
            },
            "rounds": rounds,
            "system": figures["system"],
            "bare": figures["bare"],
            "ratio_best": ratio(figures["system"]["best"], figures["bare"]["best"]),
            "ratio_median": ratio(figures["system"]["median"], figures["bare"]["median"]),
            "ratio_cpu_best": ratio(figures["system"]["cpu_best"], figures["bare"]["cpu_best"]),
            "ratio_steps_best": ratio(
                figures["system"]["steps_best"], figures["bare"]["steps_best"]
            ),
            "goal": GOAL,
        },
        out,
    )


def _figures(runs: list[Result]) -> dict[str, Any]:
    speeds = [r["samples_per_second"] for r in runs]
    return {
        "steps_best": max(r["step_samples_per_second"] for r in runs),
        "cpu_best": max(r["samples_per_cpu_second"] for r in runs),
        "cpu_all": [r["samples_per_cpu_second"] for r in runs],
        "best": max(speeds),
        "median": median(speeds),
        "all": speeds,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "events": runs[0].get("events"),
    }


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=5, help="bare/system pairs to run")
    p.add_argument("--child", choices=("system", "bare"), help="one side, in this process")
    args = p.parse_args()
    if args.child:
        child(args.child, args.quick)
    else:
        main(args.rounds, args.quick, args.json)
