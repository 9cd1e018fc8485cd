"""The trainer's GPU loop measured: model FLOP utilisation, samples/s against a bare loop,
and scaling from 1 to N devices.

- samples/s: the trainer's own `run_training` and a bare loop (the same model, data,
  batch and precision; data resident on the device, no host sync inside a step, no
  schedule, metrics, hooks or checkpoints), each timed over every epoch's steps after
  the first WARMUP_STEPS, from a synchronised start to a synchronised end; goal: a
  ratio of at least GOAL.
- MFU: the FLOPs of one training step (forward and backward), counted with
  torch.utils.flop_counter.FlopCounterMode, times steps per second, over the device's
  dense peak for the dtype (PEAK_TFLOPS).
- scaling: samples/s of `run_training` with `devices: N` against 1 when N GPUs are here.

The trainer's ONNX export at completion is skipped: it is not part of the loop.
Nothing comes from the network (pretrained=False, synthetic data). `--cpu` (chosen by
itself where there is no CUDA device) runs it all on the CPU with a tiny model: a smoke
test of this script, whose figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Result, emit, ratio, workdir
from services.trainer import job as trainer_job
from services.trainer import loop
from services.trainer.control import Checkpoint, Control, Metrics, NullHooks, StepInfo
from services.trainer.dataset import load_dataset, split_indices
from services.trainer.job import run_training
from services.trainer.loop import Batch, Runtime, Split, feed, place, resolve_runtime
from services.trainer.model import build_model, gaussian_nll
from shared.config import JobConfig

GOAL = 0.95
WARMUP_STEPS = 5
# Dense (no sparsity) tensor-core peaks in TFLOP/s: NVIDIA's datasheets for H100 and
# H200 (SXM, PCIe, NVL), A100, L40S, L4 and A10, their "with sparsity" figures halved.
# fp16 runs at the bf16 rate; fp32 matmuls run as TF32 (the trainer sets "high" on CUDA).
# The first name found in the device's name wins: the longer names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0}),
    ("H200", {"bf16": 989.5, "tf32": 494.5}),
    ("H100", {"bf16": 989.5, "tf32": 494.5}),
    ("A100", {"bf16": 312.0, "tf32": 156.0}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0}),
    ("L4", {"bf16": 121.0, "tf32": 60.0}),
    ("A10", {"bf16": 125.0, "tf32": 62.5}),
)


@dataclass
class Window:
    """Each epoch's steps after the warm-up: seconds between device-synchronised edges,
    host seconds between steps and host seconds spent getting batches."""

    warmup: int
    cuda: bool
    seconds: float = 0.0
    steps: int = 0
    data_seconds: float = 0.0
    intervals: list[float] = field(default_factory=list)
    _start: float | None = None
    _last: float = 0.0

    def tick(self, step: int, steps: int) -> None:
        """After step `step` (1-based) of an epoch of `steps`."""
        if self.cuda and step in (self.warmup, steps):
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            self.intervals.append(now - self._last)
            if step == steps:
                self.seconds += now - self._start
                self.steps += steps - self.warmup
                self._start = None
        elif step == self.warmup:
            self._start = now
        self._last = now

    def data(self, seconds: float) -> None:
        if self._start is not None:
            self.data_seconds += seconds

    def figures(self, batch: int, flops_per_step: int, peak: float | None) -> Result:
        per_second = self.steps / self.seconds if self.seconds else math.nan
        achieved = flops_per_step * per_second / 1e12
        ordered = sorted(self.intervals)
        return {
            "samples_per_second": batch * per_second,
            "steps_timed": self.steps,
            "step_ms_median": 1000 * ordered[len(ordered) // 2] if ordered else None,
            "data_share": self.data_seconds / self.seconds if self.seconds else None,
            "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None,
        }


class WindowHooks(NullHooks):
    """The trainer's hooks with a clock; they never read the loss."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.epochs: list[Metrics] = []

    def check(self, step: StepInfo) -> Control:
        self.window.tick(step.step, step.steps_per_epoch)
        return Control.CONTINUE

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self.epochs.append(metrics)


@contextmanager
def replaced(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed_feed(window: Window) -> Callable[..., Iterator[Batch]]:
    def timed(*args: Any) -> Iterator[Batch]:
        batches = feed(*args)
        while True:
            begun = time.perf_counter()
            batch = next(batches, None)
            window.data(time.perf_counter() - begun)
            if batch is None:
                return
            yield batch

    return timed


def system(config: JobConfig, window: Window, trained: int) -> tuple[Result, str]:
    """`run_training` as a trainer runs it, less the ONNX export; also where its data was."""
    hooks, placed = WindowHooks(window), ["cpu"]

    def noted(splits: tuple[Split, ...], runtime: Runtime) -> tuple[Split, ...]:
        out = place(splits, runtime)
        if runtime.cuda:
            placed[0] = "resident" if out[0].inputs.device == runtime.device else "prefetched"
        return out

    with (
        workdir() as tmp,
        replaced(trainer_job, "export_at_completion", lambda *_: None),
        replaced(loop, "feed", timed_feed(window)),
        replaced(trainer_job, "place", noted),
    ):
        started = time.perf_counter()
        outcome = run_training(config, tmp, hooks)
        wall = time.perf_counter() - started
    if outcome.kind != "completed":
        raise RuntimeError(f"the trainer's run ended {outcome.kind}")
    return {"wall_samples_per_second": trained / wall} | _memory(config), placed[0]


def _memory(config: JobConfig) -> Result:
    """The peak GPU memory since the last call."""
    if config.accelerator == "cpu":
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gpu_memory_gib": peak}


def _model(config: JobConfig, runtime: Runtime, shape: tuple[int, ...]) -> nn.Module:
    model: nn.Module = build_model(config, shape[0], (shape[1], shape[2])).to(runtime.device)
    return model.to(memory_format=torch.channels_last) if runtime.cuda else model


def step_flops(model: nn.Module, runtime: Runtime, batch: int, shape: tuple[int, ...]) -> int:
    """The FLOPs of one training step's forward and backward passes."""
    x = torch.randn(batch, *shape, device=runtime.device)
    y = torch.randn(batch, 2, device=runtime.device)
    with FlopCounterMode(display=False) as counter:
        with runtime.autocast():
            out = model(runtime.inputs(x))
        gaussian_nll(out, y).mean().backward()  # type: ignore[no-untyped-call]
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


Pair = tuple[torch.Tensor, torch.Tensor]  # inputs, normalised targets


def bare_data(config: JobConfig, runtime: Runtime) -> tuple[Pair, Pair]:
    """The job's training and validation data, resident on the device."""
    data = load_dataset(config.dataset)
    x = torch.from_numpy(data.inputs)
    y = torch.from_numpy(data.normalise(data.positions)).float()
    train, val = split_indices(len(y), config.validation_split, config.seed)
    pairs = [(x[rows].to(runtime.device), y[rows].to(runtime.device)) for rows in (train, val)]
    return pairs[0], pairs[1]


def bare(
    config: JobConfig, runtime: Runtime, data: Pair, val: Pair, window: Window
) -> tuple[Result, int]:
    """Plain PyTorch at its best: its wall samples/s and one step's FLOPs."""
    inputs, targets = data
    shape = tuple(inputs.shape[1:])
    model = _model(config, runtime, shape)
    flops = step_flops(model, runtime, config.batch_size, shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, fused=runtime.cuda)
    batch, steps = config.batch_size, len(inputs) // config.batch_size
    started = time.perf_counter()
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(inputs), device=runtime.device)[: steps * batch]
        for step, idx in enumerate(order.view(steps, batch), start=1):
            begun = time.perf_counter()
            x, y = runtime.inputs(inputs.index_select(0, idx)), targets.index_select(0, idx)
            window.data(time.perf_counter() - begun)
            with runtime.autocast():
                loss = gaussian_nll(model(x), y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            optimizer.step()
            window.tick(step, steps)
        _validate(model, runtime, val, 2 * batch)
    samples = config.epochs * steps * batch
    return {"wall_samples_per_second": samples / (time.perf_counter() - started)}, flops


@torch.no_grad()
def _validate(model: nn.Module, runtime: Runtime, val: Pair, batch: int) -> float:
    model.eval()
    losses = []
    for start in range(0, len(val[0]), batch):
        with runtime.autocast():
            out = model(runtime.inputs(val[0][start : start + batch]))
        losses.append(gaussian_nll(out, val[1][start : start + batch]).sum())
    return float(torch.stack(losses).sum().item()) if losses else 0.0  # one sync a pass


def peak_tflops(device: str, dtype: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    for name, peaks in PEAK_TFLOPS:
        if name in device:
            return peaks.get(dtype), f"NVIDIA datasheet, {name} {dtype} dense"
    return None, f"no peak known for {device!r}: pass --peak-tflops"


def scaling(config: JobConfig, one: float, cuda: bool) -> Result:
    """samples/s of training steps with 1 and N devices, N the GPUs here: N through the
    real trainer as a torchrun group (`bench.group.run_system` on the embedded store), the
    same batch on each device (a global batch N times larger)."""
    n = torch.cuda.device_count() if cuda else 1
    out: Result = {"devices_here": n, "samples_per_second": {"1": one}}
    if n < 2:
        out["note"] = "one device here: scaling from 1 to N needs several"
        return out
    from bench.group import run_system, trained_samples

    group = config.model_copy(update={"devices": n, "batch_size": n * config.batch_size})
    group = JobConfig.model_validate(group.model_dump())
    result = run_system(group, database_url=None)
    speed = trained_samples(group) / result["step_seconds"]
    out["samples_per_second"][str(n)] = speed
    out["efficiency"] = speed / (n * one)
    out["first_step_seconds"] = result["first_step_seconds"]
    return out


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
    config, cuda = job(args), not args.cpu
    runtime = resolve_runtime(config.accelerator, config.precision)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{config.model_architecture} on {device}, batch {config.batch_size}", flush=True)
    train, val = bare_data(config, runtime)
    steps = len(train[0]) // config.batch_size
    warmup = max(1, min(WARMUP_STEPS, steps // 2))
    trained = config.epochs * steps * config.batch_size
    peak, source = peak_tflops(device, "bf16" if cuda else "fp32", args.peak_tflops)
    windows = {side: Window(warmup, cuda) for side in ("bare", "system")}
    sides: dict[str, Result] = {}
    sides["bare"], flops = bare(config, runtime, train, val, windows["bare"])
    del train, val
    sides["bare"] |= _memory(config)
    sides["system"], placed = system(config, windows["system"], trained)
    for side, window in windows.items():
        sides[side] |= window.figures(config.batch_size, flops, peak)
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
        "warmup_steps": warmup,
        "trainer_data": placed,
        "flops_per_step": flops,
        "peak_tflops": peak,
        "peak_source": source,
        "system": sides["system"],
        "bare": sides["bare"],
        "ratio": ratio(sides["system"]["samples_per_second"], sides["bare"]["samples_per_second"]),
        "goal": GOAL,
        "scaling": scaling(config, sides["system"]["samples_per_second"], cuda),
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
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak, if not in the table")
    a = p.parse_args()
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device here: running the CPU smoke run (--cpu) instead", flush=True)
        a.cpu = True
    a.model = a.model or ("convnext_atto" if a.cpu else "convnext_large")
    a.batch_size = a.batch_size or (16 if a.cpu else 128)
    a.samples = a.samples or (160 if a.cpu else 4096 if a.quick else 16384)
    main(a)
