"""Figure 11: a `devices: 2` job through the whole system against two bare DDP ranks.

CPU, gloo, one thread a rank, the same model, data, global batch, epochs and seed on both
sides. The system side is the real path: a job submitted to a PostgreSQL store,
projected, claimed by the trainer service, launched as a torchrun group by
`services.trainer.launcher` (the reporter's hooks, the lease, a stop agreed at every
step, the step numbers summed across ranks, checkpoints, events). The bare side is
torchrun's elastic launcher starting two ranks of a plain DDP loop (`bench.bare_loop`).
Both are timed from the launch to the end of the job (process start, rendezvous, data,
training, validation, saved weights). The system's time to its first step is measured
from the submit. Runs alternate, each in a process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench.common import (
    DATABASE_URL,
    Result,
    alternate,
    emit,
    fresh_schema,
    median,
    parser,
    ratio,
    run_child,
    workdir,
)
from shared.config import JobConfig

GOAL = 0.95
WORLD_SIZE = 2


def job_config(quick: bool) -> JobConfig:
    samples = 320 if quick else 2048
    return JobConfig.model_validate(
        {
            "epochs": 2,
            "batch_size": 32,  # 16 a rank
            "accelerator": "cpu",
            "devices": WORLD_SIZE,
            "model_architecture": "convnext_atto",
            "validation_split": 0.2,
            "dataset": {"kind": "synthetic", "samples": samples, "n_mels": 64, "frames": 32},
        }
    )


def trained_samples(config: JobConfig) -> int:
    from services.trainer.worker import dataset_sizes

    train, _ = dataset_sizes(config)
    return config.epochs * (train // config.batch_size) * config.batch_size


def run_system(config: JobConfig, database_url: str | None = DATABASE_URL) -> Result:
    """Submit, project, claim, launch the group, train; time the job and its first step.
    On PostgreSQL, or without `database_url` on the embedded SQLite store (a GPU machine
    without a database server)."""
    from services.projector.runner import Projector
    from services.trainer.worker import build_trainer
    from shared.bootstrap import build_app, build_read_store
    from shared.bus import InProcessBus
    from shared.settings import Settings

    schema_of = fresh_schema("bench_group") if database_url else nullcontext("public")
    with schema_of as schema, workdir() as tmp:
        settings = Settings(
            database_url=database_url, database_schema=schema, data_dir=tmp, rank_threads=1
        )
        jobs, reads, bus = build_app(settings), build_read_store(settings), InProcessBus()
        trainer = build_trainer(settings, jobs, reads, bus)
        submitted = time.perf_counter()
        job = jobs.submit("bench", "", config.model_dump(mode="json"), "bench").job
        first_step: list[float] = []

        def watch() -> None:
            while not first_step:
                hooks = trainer.current
                if hooks is not None and hooks.last_step is not None:
                    first_step.append(time.perf_counter() - submitted)
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()

        async def main() -> float:
            await Projector(jobs, reads, InProcessBus()).catch_up()  # the row, no message
            started = time.perf_counter()
            if not await trainer.run_next():
                raise RuntimeError("the trainer found no runnable job")
            return time.perf_counter() - started

        seconds = asyncio.run(main())
        status = jobs.get_job(job.id).status
        history = jobs.history(job.id)
        reads.close()
    if status != "completed":
        raise RuntimeError(f"bench job ended {status}, not completed")
    epochs = [e.data["metrics"] for e in history if e.kind == "EpochCompleted"]
    per_epoch = trained_samples(config) / len(epochs)
    step_seconds = sum(per_epoch / m["samples_per_second"] for m in epochs)
    return {
        "seconds": seconds,
        "step_seconds": step_seconds,
        "first_step_seconds": first_step[0] if first_step else None,
        "events": len(history),
    }


def run_bare(config: JobConfig) -> Result:
    """torchrun's elastic launcher starting WORLD_SIZE ranks of the bare DDP loop."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with workdir() as tmp:
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=WORLD_SIZE,
            run_id=f"bench-{os.getpid()}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            max_restarts=0,
            monitor_interval=0.1,
        )
        quick = ["--quick"] if trained_samples(config) < 1000 else []
        started = time.perf_counter()
        elastic_launch(launch, sys.executable)("-m", "bench.group", "--rank", str(tmp), *quick)
        seconds = time.perf_counter() - started
        steps = json.loads((tmp / "rank-0.json").read_text())
    return {"seconds": seconds, "step_seconds": steps["step_seconds"]}


def rank(out: Path, quick: bool) -> None:
    """One bare rank (under torchrun): the plain loop under DDP, one thread."""
    import torch
    import torch.distributed as dist

    from bench.bare_loop import StepClock, train_bare

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    clock = StepClock()
    train_bare(
        job_config(quick), out, torch.device("cpu"), clock=clock,
        ddp=(dist.get_rank(), dist.get_world_size()),
    )  # fmt: skip
    if dist.get_rank() == 0:
        (out / "rank-0.json").write_text(json.dumps({"step_seconds": sum(clock.steps)}))
    dist.destroy_process_group()


def child(mode: str, quick: bool) -> None:
    config = job_config(quick)
    result = run_system(config) if mode == "system" else run_bare(config)
    samples = trained_samples(config)
    result |= {
        "mode": mode,
        "samples": samples,
        "samples_per_second": samples / result["seconds"],
        "step_samples_per_second": samples / result["step_seconds"],
    }
    print(json.dumps(result))


def main(rounds: int, quick: bool, out: Path | None) -> None:
    """Alternate bare and system runs (ABBA...) so drift in the machine's load hits both."""

    def run(mode: str) -> Result:
        last = run_child("bench.group", mode, quick, 900)
        print(
            f"{mode}: {last['samples_per_second']:.1f} samples/s,"
            f" steps {last['step_samples_per_second']:.1f} samples/s",
            flush=True,
        )
        return last

    runs = alternate(rounds, run)
    figures = {m: _figures(rs) for m, rs in runs.items()}
    config = job_config(quick)
    first = [r["first_step_seconds"] for r in runs["system"] if r["first_step_seconds"]]
    emit(
        {
            "figure": "group",
            "config": {
                "model": config.model_architecture,
                "global_batch": config.batch_size,
                "world_size": WORLD_SIZE,
                "epochs": config.epochs,
                "samples": trained_samples(config),
                "input": [7, 64, 32],
            },
            "rounds": rounds,
            "system": figures["system"],
            "bare": figures["bare"],
            "ratio_best": ratio(figures["system"]["best"], figures["bare"]["best"]),
            "ratio_median": ratio(figures["system"]["median"], figures["bare"]["median"]),
            "ratio_steps_best": ratio(
                figures["system"]["steps_best"], figures["bare"]["steps_best"]
            ),
            "first_step_seconds": {"median": median(first), "all": first},
            "goal": GOAL,
        },
        out,
    )


def _figures(runs: list[Result]) -> dict[str, Any]:
    speeds = [r["samples_per_second"] for r in runs]
    return {
        "best": max(speeds),
        "median": median(speeds),
        "all": speeds,
        "steps_best": max(r["step_samples_per_second"] for r in runs),
        "seconds_all": [r["seconds"] for r in runs],
        "events": runs[0].get("events"),
    }


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=3, help="bare/system pairs to run")
    p.add_argument("--child", choices=("system", "bare"), help="one side, in this process")
    p.add_argument("--rank", type=Path, help="(internal) one bare rank, writing here")
    args = p.parse_args()
    if args.rank:
        rank(args.rank, args.quick)
    elif args.child:
        child(args.child, args.quick)
    else:
        main(2 if args.quick else args.rounds, args.quick, args.json)
