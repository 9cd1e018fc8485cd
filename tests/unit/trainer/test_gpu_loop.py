"""The loop keeps a step's numbers on the device and reads them only at its read points."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from services.trainer import loop
from services.trainer.control import Checkpoint, Metrics, NullHooks, StepInfo
from services.trainer.job import run_training
from services.trainer.loop import (
    EpochPlan,
    Geo,
    LrSchedule,
    Runtime,
    Split,
    StepParts,
    Tally,
    epoch_batches,
    epoch_train_metrics,
    feed,
    haversine_m,
    place,
    resolve_runtime,
    train_one_epoch,
)
from services.trainer.model import Localiser, build_model, gaussian_nll, split_output
from shared.config import JobConfig
from tests.unit.trainer.configs import tiny_config

CPU = Runtime(torch.device("cpu"), None)
GEO = Geo(centre=(45.0, 8.0), scale=(0.5, 1.0))
N, BATCH = 48, 8
HOST_READS = ("tolist", "item", "__float__", "__int__")


def _data(n: int = N, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(n, 2, generator=g) * 0.3
    return Split(torch.randn(n, 1, 4, 4, generator=g), targets, GEO.degrees(targets))


def _trainer(model: nn.Module, runtime: Runtime = CPU) -> StepParts:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=runtime.cuda or None)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=False)
    schedule = LrSchedule("cosine", 1e-2, 1, N // BATCH, 0)
    return StepParts(model, optimizer, scaler, schedule, runtime, GEO, 1.0, 20_000.0)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


def _plan() -> EpochPlan:
    return EpochPlan(1, epoch_batches(N, BATCH, 0, 1))


def _per_step_reference(t: StepParts, data: Split, plan: EpochPlan) -> Metrics:
    """The epoch's metrics as the loop used to get them: every step read back to the host."""
    totals = {"samples": 0, "loss": 0.0, "hits": 0, "norms": 0.0, "finite": 0, "sq": 0.0}
    params = list(t.model.parameters())
    for index, idx in enumerate(plan.batches):
        lr = t.schedule.apply(t.optimizer, plan.epoch, index)
        out = t.model(data.inputs[idx])
        loss = gaussian_nll(out, data.targets[idx]).mean()
        t.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
        t.optimizer.step()
        centre, scale = (torch.tensor(v, dtype=torch.float64) for v in (GEO.centre, GEO.scale))
        degrees = split_output(out)[0].detach().double() * scale + centre
        distance = haversine_m(degrees, data.positions[idx])
        hits = (distance <= t.accuracy_radius_m).sum().double()
        values = torch.stack([loss.detach().double(), norm.double(), hits, distance.square().sum()])
        step_loss, step_norm, step_hits, step_sq = values.tolist()
        totals["samples"] += len(idx)
        totals["loss"] += step_loss * len(idx)
        totals["hits"] += int(step_hits)
        totals["sq"] += step_sq
        if math.isfinite(step_norm):
            totals["norms"] += step_norm
            totals["finite"] += 1
    n = totals["samples"]
    return {
        "train_loss": totals["loss"] / n,
        "train_accuracy": totals["hits"] / n,
        "train_rmse_m": math.sqrt(totals["sq"] / n),
        "learning_rate": lr,
        "gradient_norm": totals["norms"] / totals["finite"],
    }


def test_metrics_summed_on_the_device_equal_those_read_every_step() -> None:
    data, model = _data(), _model()
    reference = _trainer(copy.deepcopy(model))
    expected = _per_step_reference(reference, data, _plan())
    t, tally = _trainer(model), Tally()
    train_one_epoch(t, data, _plan(), tally, lambda *_: False)
    assert epoch_train_metrics(tally) == expected  # bit for bit on the CPU
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference.model.state_dict()[name]), name


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Each read of a tensor's value back to the host made by the trainer's own code (not
    by torch's: its CPU optimizers read their step counts), by method name."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self: Tensor, *a: object, _name: str = name, _f: object = original) -> object:
            if sys._getframe(1).f_globals["__name__"].startswith("services.trainer."):
                reads.append(_name)
            return _f(self, *a)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield reads


def test_an_epoch_reads_the_device_once_unless_a_hook_asks(
    monkeypatch: pytest.MonkeyPatch, host_reads: list[str]
) -> None:
    monkeypatch.setattr(loop, "READ_SECONDS", math.inf, raising=False)
    train_one_epoch(_trainer(_model()), _data(), _plan(), Tally(), lambda *_: False)
    assert len(host_reads) == 1  # the epoch's sums, at its end


def test_a_hook_that_reads_the_loss_pays_one_read_each_time(
    monkeypatch: pytest.MonkeyPatch, host_reads: list[str]
) -> None:
    monkeypatch.setattr(loop, "READ_SECONDS", math.inf, raising=False)
    losses: list[float] = []

    def stop(step: int, loss: Callable[[], float] | float, speed: float) -> bool:
        info = StepInfo(1, step, N // BATCH, loss, speed)
        if step % 3 == 0:
            losses.append(info.loss)
            assert info.loss == losses[-1]  # read once, then kept
        return False

    train_one_epoch(_trainer(_model()), _data(), _plan(), Tally(), stop)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert len(host_reads) == 1 + 2


def test_the_sums_are_read_every_read_seconds(
    monkeypatch: pytest.MonkeyPatch, host_reads: list[str]
) -> None:
    monkeypatch.setattr(loop, "READ_SECONDS", 0.0, raising=False)
    train_one_epoch(_trainer(_model()), _data(), _plan(), Tally(), lambda *_: False)
    assert len(host_reads) == N // BATCH  # each step; none left for the end


def test_step_info_reads_its_loss_only_when_asked() -> None:
    reads: list[int] = []

    def read() -> float:
        reads.append(1)
        return 0.25

    info = StepInfo(2, 3, 6, read, 8.0)
    assert reads == [] and info.samples_per_second == 8.0
    assert info.loss == 0.25 and info.loss == 0.25 and reads == [1]
    assert info == StepInfo(2, 3, 6, loss=0.25, samples_per_second=8.0)


class NanAfter(nn.Module):
    """`inner`, until `steps` forward passes in train mode have run: then NaN."""

    def __init__(self, inner: nn.Module, steps: int) -> None:
        super().__init__()
        self.inner, self.steps = inner, steps

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        if self.training:
            self.steps -= 1
            if self.steps < 0:
                return out * math.nan
        return out


@pytest.mark.parametrize("stop_at", [None, 3])
def test_a_nan_training_loss_fails_the_epoch_before_it_can_be_saved(stop_at: int | None) -> None:
    t = _trainer(NanAfter(_model(), steps=2))
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        train_one_epoch(t, _data(), _plan(), Tally(), lambda step, *_: step == stop_at)


def test_a_nan_training_loss_fails_the_job_without_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(config: JobConfig, in_chans: int, size: tuple[int, int]) -> Localiser:
        return NanAfter(build_model(config, in_chans, size), steps=8)  # type: ignore[return-value]

    class Saved(NullHooks):
        def __init__(self) -> None:
            self.saved: list[str] = []

        def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
            self.saved.append(checkpoint.uri)

    monkeypatch.setattr("services.trainer.job.build_model", broken)
    hooks = Saved()
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        run_training(tiny_config(epochs=2), tmp_path, hooks)
    assert len(hooks.saved) == 1  # epoch 1 (6 steps) was clean; epoch 2 never saved


def test_on_the_cpu_the_data_stays_where_it_is() -> None:
    train, val = _data(), _data(8, seed=1)
    assert place((train, val), CPU) == (train, val)


# --- on a GPU ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_trainer(precision: str) -> tuple[StepParts, Split]:
    config = tiny_config(accelerator="gpu", precision=precision)
    runtime = resolve_runtime("gpu", precision)
    model = build_model(config, 7, (16, 16)).to(runtime.device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    schedule = LrSchedule("cosine", 1e-3, 2, 8, 1)
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(128, 2, generator=g) * 0.3
    data = Split(torch.randn(128, 7, 16, 16, generator=g), targets, GEO.degrees(targets))
    return StepParts(model, optimizer, scaler, schedule, runtime, GEO, 1.0, 20_000.0), data


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("resident", [True, False])
def test_gpu_steps_never_synchronise_with_the_host(
    monkeypatch: pytest.MonkeyPatch, precision: str, resident: bool
) -> None:
    t, host_data = _gpu_trainer(precision)
    (data,) = place((host_data,), t.runtime, share=1.0 if resident else 0.0)
    assert (data.inputs.device.type == "cuda") is resident
    read = loop.to_host

    def sanctioned(tensor: Tensor) -> list[float]:  # the loop's own read points may sync
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read(tensor)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(loop, "to_host", sanctioned)
    monkeypatch.setattr(loop, "READ_SECONDS", math.inf)
    seen: list[StepInfo] = []

    def stop(step: int, loss: Callable[[], float] | float, speed: float) -> bool:
        seen.append(StepInfo(1, step, 8, loss, speed))  # a hook that does not read the loss
        return False

    train_one_epoch(t, data, EpochPlan(1, epoch_batches(128, 16, 0, 1)), Tally(), stop)  # warm-up
    torch.cuda.synchronize()
    tally = Tally()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_one_epoch(t, data, EpochPlan(2, epoch_batches(128, 16, 0, 2)), tally, stop)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tally.steps == 8 and math.isfinite(tally.loss_sum)
    assert math.isfinite(seen[-1].loss)


@needs_cuda
def test_resident_and_prefetched_batches_are_the_same() -> None:
    runtime = Runtime(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    host = _data()
    (resident,) = place((host,), runtime, share=1.0)
    batches = epoch_batches(N, BATCH, 0, 1)
    for a, b in zip(feed(resident, batches, runtime), feed(host, batches, runtime), strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.device.type == y.device.type == "cuda" and torch.equal(x, y)
