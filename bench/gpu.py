"""convnext_large in bf16 through the trainer's own loop (`run_training`) vs a bare loop.

Prints samples/s of each over the training steps (after a warm-up), their ratio (goal
0.95), the peak GPU memory of each, and the share of step time spent getting each batch
onto the device. Nothing comes from the network (pretrained=False, synthetic data).
`--cpu` runs the same code on the CPU with a tiny model: a smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.bare_loop import StepClock, train_bare
from bench.common import Result, emit, ratio, workdir
from services.trainer.control import Control, NullHooks, StepInfo
from services.trainer.job import run_training
from services.trainer.loop import Runtime, resolve_runtime
from shared.config import JobConfig

GOAL = 0.95
WARMUP_STEPS = 5
F = TypeVar("F", bound=Callable[..., torch.Tensor])


class TimedHooks(NullHooks):
    """The trainer's hooks with a clock: each step's duration, check to check."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self._last: float | None = None
        self._epoch = 0

    def check(self, step: StepInfo) -> Control:
        now = time.perf_counter()
        if self._last is not None and step.epoch == self._epoch:
            self.clock.steps.append(now - self._last)
        self._last, self._epoch = now, step.epoch
        return Control.CONTINUE


def timing_data(clock: StepClock) -> Callable[[], None]:
    """Time `Runtime.inputs` and `Runtime.put` (the batch's way onto the device); undo."""
    originals = Runtime.inputs, Runtime.put

    def timed(method: F) -> F:
        def wrapper(self: Runtime, t: torch.Tensor) -> torch.Tensor:
            begun = time.perf_counter()
            try:
                return method(self, t)
            finally:
                clock.data.append(time.perf_counter() - begun)

        return wrapper  # type: ignore[return-value]

    Runtime.inputs, Runtime.put = timed(Runtime.inputs), timed(Runtime.put)  # type: ignore[method-assign]

    def undo() -> None:
        Runtime.inputs, Runtime.put = originals  # type: ignore[method-assign]

    return undo


def figures(clock: StepClock, batch: int, wall: float, samples: int, cuda: bool) -> Result:
    steps = clock.steps[WARMUP_STEPS:] or clock.steps
    data = sum(clock.data) * len(steps) / max(len(clock.data), 1) if clock.data else 0.0
    result: Result = {
        "samples_per_second": batch * len(steps) / sum(steps) if steps else float("nan"),
        "wall_samples_per_second": samples / wall,
        "steps_timed": len(steps),
        "step_ms_median": 1000 * sorted(steps)[len(steps) // 2] if steps else None,
        "data_share": data / sum(steps) if steps else None,
    }
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return result


def system(config: JobConfig, trained: int, cuda: bool) -> Result:
    hooks = TimedHooks()
    clock = StepClock()
    undo = timing_data(clock)
    try:
        with workdir() as tmp:
            started = time.perf_counter()
            outcome = run_training(config, tmp, hooks)
            wall = time.perf_counter() - started
    finally:
        undo()
    if outcome.kind != "completed":
        raise RuntimeError(f"the trainer's run ended {outcome.kind}")
    # `inputs` and `put` run three times a step (inputs, targets, positions) plus validation.
    hooks.clock.data = clock.data
    return figures(hooks.clock, config.batch_size, wall, trained, cuda)


def bare(config: JobConfig, trained: int, cuda: bool) -> Result:
    runtime = resolve_runtime(config.accelerator, config.precision)
    clock = StepClock()
    with workdir() as tmp:
        wall = train_bare(config, tmp, runtime.device, runtime.autocast_dtype, clock)
    return figures(clock, config.batch_size, wall, trained, cuda)


def job(args: argparse.Namespace) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model_architecture": args.model,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "precision": "bf16",
            "accelerator": "cpu" if args.cpu else "gpu",
            "validation_split": 0.1,
            "dataset": {"kind": "synthetic", "samples": args.samples, "n_mels": 64, "frames": 32},
        }
    )


def main(args: argparse.Namespace) -> None:
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --cpu for a smoke run")
    config = job(args)
    cuda = not args.cpu
    from services.trainer.worker import dataset_sizes

    train, _ = dataset_sizes(config)
    trained = config.epochs * (train // config.batch_size) * config.batch_size
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{config.model_architecture} on {device}, batch {config.batch_size}", flush=True)
    sides: dict[str, Result] = {}
    for side in ("bare", "system"):
        sides[side] = (bare if side == "bare" else system)(config, trained, cuda)
        print(f"{side}: {json.dumps(sides[side])}", flush=True)
    out: dict[str, Any] = {
        "figure": "gpu",
        "device": device,
        "torch": torch.__version__,
        "model": config.model_architecture,
        "precision": "bf16" if cuda else "fp32",
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "samples_trained": trained,
        "system": sides["system"],
        "bare": sides["bare"],
        "ratio": ratio(sides["system"]["samples_per_second"], sides["bare"]["samples_per_second"]),
        "goal": GOAL,
    }
    emit(out, args.json)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    p.add_argument("--cpu", action="store_true", help="smoke run on the CPU (tiny model)")
    p.add_argument(
        "--model", default=None, help="timm model (convnext_large; --cpu: convnext_atto)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (--cpu: 16)")
    p.add_argument("--samples", type=int, default=None, help="default 16384 (--cpu: 160)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer samples (as `make bench --quick`)")
    a = p.parse_args()
    a.model = a.model or ("convnext_atto" if a.cpu else "convnext_large")
    a.batch_size = a.batch_size or (16 if a.cpu else 128)
    a.samples = a.samples or (160 if a.cpu else 4096 if a.quick else 16384)
    main(a)
