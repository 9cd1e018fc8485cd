"""The plain PyTorch loop, kept apart from job code: one training epoch, one validation
pass, how batches reach the device, and the learning-rate schedule.

Batches: on a GPU, `place` moves the splits to the device once when together they take at
most `share` of its free memory; a resident split's batches are gathered there, from index
tensors copied once an epoch. A split left on the host has each batch gathered there,
pinned and copied on a side stream while the step before it runs. On a CPU the batches
are gathered as they always were.

Learning-rate schedules have a linear warmup, are set per optimizer step and are
checkpointable (`LrSchedule`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from services.trainer.dataset import steps_per_epoch
from services.trainer.model import (
    CALIBRATION_SHARE,
    gaussian_nll,
    inside_68,
    mahalanobis_sq,
    split_output,
)

if TYPE_CHECKING:
    from services.trainer.group import Group

EARTH_RADIUS_M = 6_371_008.8
METRES_PER_DEGREE = EARTH_RADIUS_M * math.pi / 180  # about 111,195 m of latitude
# How often a long epoch reads its running sums back (a host sync) to catch a NaN loss.
READ_SECONDS = 2.0


def to_host(t: Tensor) -> list[float]:
    """The loop's one way to read numbers off the device: it waits for the device."""
    values: list[float] = t.reshape(-1).tolist()
    return values


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: device, autocast dtype, memory layout."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def inputs(self, x: Tensor) -> Tensor:
        if not self.cuda:
            return x
        return self.put(x).contiguous(memory_format=torch.channels_last)

    def put(self, t: Tensor) -> Tensor:
        """`t` on the device; a host tensor is pinned and copied without waiting."""
        if not self.cuda or t.device == self.device:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def describe(self, world_size: int = 1) -> str:
        """e.g. `cpu (fp32)`, `cuda:0 NVIDIA H200 (bf16)`, `cpu (fp32) x 2 ranks`."""
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.autocast_dtype]
        ranks = f" x {world_size} ranks" if world_size > 1 else ""
        if not self.cuda:
            return f"cpu ({dtype}){ranks}"
        return f"{self.device} {torch.cuda.get_device_name(self.device)} ({dtype}){ranks}"


class DeviceUnavailableError(RuntimeError):
    """The job needs a device this trainer does not have: another trainer may run it."""


def resolve_runtime(accelerator: str, precision: str, devices: int = 1) -> Runtime:
    """CUDA when asked or available; autocast only there (CPU trains in fp32).
    DeviceUnavailableError for a GPU job where CUDA is not available, or sees fewer than
    `devices` GPUs (one rank each), or a CPU job for more ranks than there are CPUs."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise DeviceUnavailableError("accelerator 'gpu' requested but CUDA is not available here")
    if accelerator == "cpu" or not torch.cuda.is_available():
        if devices > (cpus := os.cpu_count() or 1):
            raise DeviceUnavailableError(
                f"devices {devices}: this trainer has {cpus} CPUs, and a CPU rank needs one"
            )
        return Runtime(torch.device("cpu"), None)
    if devices > (seen := torch.cuda.device_count()):
        raise DeviceUnavailableError(f"devices {devices}: CUDA sees {seen} GPU(s) here")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    return Runtime(torch.device("cuda", torch.cuda.current_device()), dtypes[precision])


@dataclass(frozen=True)
class Split:
    """One side of the data (on the host, or resident on the device): inputs, normalised
    targets, true degrees."""

    inputs: Tensor
    targets: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True)
class Geo:
    """Turns normalised model outputs back into (lat, lon) degrees."""

    centre: tuple[float, float]
    scale: tuple[float, float]

    def degrees(self, normalised: Tensor) -> Tensor:
        # Python scalars, not tensors: building those on a GPU would wait for it.
        n = normalised.double()
        columns = [n[..., i] * self.scale[i] + self.centre[i] for i in (0, 1)]
        return torch.stack(columns, dim=-1)

    def sigma_radius_m(self, mean: Tensor, log_var: Tensor) -> Tensor:
        """The predicted 1-sigma radius in metres, `[B]`, from normalised `[B, 2]` outputs.

        sigma_north = exp(log_var_lat / 2) * scale_lat * METRES_PER_DEGREE and
        sigma_east = exp(log_var_lon / 2) * scale_lon * METRES_PER_DEGREE * cos(lat), at
        the predicted latitude; the radius is sqrt(sigma_north^2 + sigma_east^2).
        """
        sigma = torch.exp(0.5 * log_var.double())
        north = sigma[:, 0] * self.scale[0] * METRES_PER_DEGREE
        lat = torch.deg2rad(self.degrees(mean)[:, 0].clamp(-90.0, 90.0))
        east = sigma[:, 1] * self.scale[1] * METRES_PER_DEGREE * torch.cos(lat)
        return torch.sqrt(north.square() + east.square())


def haversine_m(a: Tensor, b: Tensor) -> Tensor:
    """Great-circle metres between `[..., 2]` (lat, lon) degree tensors."""
    lat1, lon1, lat2, lon2 = (
        torch.deg2rad(v) for v in (a[..., 0], a[..., 1], b[..., 0], b[..., 1])
    )
    dlat, dlon = (lat2 - lat1) / 2, (lon2 - lon1) / 2
    h = torch.sin(dlat) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin(dlon) ** 2
    return 2 * EARTH_RADIUS_M * torch.asin(torch.sqrt(h.clamp(0.0, 1.0)))


class StepNumbers(NamedTuple):
    """One step's numbers, 0-d tensors left where they were computed."""

    loss: Tensor  # the batch's mean
    grad_norm: Tensor  # before clipping
    hits: Tensor
    squared_distance: Tensor  # metres^2, summed over the batch


SUMS = ("loss_sum", "grad_norm_sum", "finite_norms", "hits", "squared_distance_sum")


@dataclass
class Tally:
    """Running sums of one training epoch; saved in a mid-epoch checkpoint.

    Steps add to float64 sums on the device, seeded from the fields; `settle` reads them
    back into the fields. The sums are never restarted, so a resumed epoch adds in the
    same order as an uninterrupted one.
    """

    samples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    hits: int = 0
    grad_norm_sum: float = 0.0
    finite_norms: int = 0
    learning_rate: float = 0.0
    seconds: float = 0.0
    squared_distance_sum: float = 0.0  # metres^2; 0 in tallies saved before it existed
    _sums: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _unread: bool = field(default=False, init=False, repr=False, compare=False)

    def add(self, samples: int, step: StepNumbers) -> None:
        """Count one step of `samples` samples, without reading its numbers."""
        self.samples, self.steps = self.samples + samples, self.steps + 1
        finite = torch.isfinite(step.grad_norm)  # fp16 steps skipped for overflow have none
        norm = torch.where(finite, step.grad_norm.double(), 0.0)
        loss, hits = step.loss.double() * samples, step.hits.double()
        row = torch.stack([loss, norm, finite.double(), hits, step.squared_distance.double()])
        if self._sums is None:
            seed = torch.tensor([float(getattr(self, name)) for name in SUMS], dtype=torch.float64)
            self._sums = seed if row.device.type == "cpu" else _upload(seed, row.device)
        self._sums.add_(row)
        self._unread = True

    def settle(self) -> None:
        """Read the sums into the fields (a host sync); FloatingPointError for a NaN or
        infinite training loss."""
        if self._sums is None or not self._unread:
            return
        loss, norms, finite, hits, squared = to_host(self._sums)
        self.loss_sum, self.grad_norm_sum, self.squared_distance_sum = loss, norms, squared
        self.finite_norms, self.hits, self._unread = int(finite), int(hits), False
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} within the epoch's first {self.steps} steps"
            )

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain numbers (read from the device first)."""
        self.settle()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


def _upload(t: Tensor, device: torch.device) -> Tensor:
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class StepParts:
    """What a training step needs besides the batch (the loop's state; the service that
    takes jobs is `services.trainer.worker.Trainer`)."""

    model: nn.Module
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    schedule: LrSchedule
    runtime: Runtime
    geo: Geo
    max_grad_norm: float | None
    accuracy_radius_m: float
    group: Group | None = None  # a rank of a torchrun group: `model` is under DDP

    @property
    def world_size(self) -> int:
        return self.group.world_size if self.group else 1


# (steps done, the step's loss unread, samples per second) -> stop now?
StopAfter = Callable[[int, Callable[[], float], float], bool]


@dataclass(frozen=True)
class EpochPlan:
    """Epoch `epoch` (1-based) runs `batches` (index tensors) from `first_step` on."""

    epoch: int
    batches: list[Tensor]
    first_step: int = 0


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """This epoch's shuffled batches, drawn from (seed, epoch) alone so a resume sees them too.

    The remainder is dropped (a different one each epoch) so no batch is a lone sample.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    size = min(batch_size, n)
    return list(torch.split(order[: steps_per_epoch(n, batch_size) * size], size))


def train_one_epoch(
    t: StepParts, data: Split, plan: EpochPlan, tally: Tally, stop: StopAfter
) -> bool:
    """Train on the plan's batches, updating `tally`; True if `stop` said so.

    `stop(steps_done, loss, samples_per_second)` is asked after every step, with the
    step's loss unread (reading it waits for the device). Nothing in a step waits for
    the device: the sums are read every READ_SECONDS and when the epoch ends or stops,
    so a NaN loss raises FloatingPointError that late (plus the steps the device has
    queued), and always before the caller can save a checkpoint.
    """
    t.model.train()
    started = time.perf_counter()
    read_at = started + READ_SECONDS
    try:
        batches = feed(data, plan.batches[plan.first_step :], t.runtime)
        for index, batch in enumerate(batches, start=plan.first_step):
            tally.learning_rate = t.schedule.apply(t.optimizer, plan.epoch, index)
            step = _step(t, batch)
            size = len(batch.inputs) * t.world_size  # the global batch
            tally.add(size, step)
            if (now := time.perf_counter()) >= read_at:
                tally.settle()
                read_at = now + READ_SECONDS
            speed = (index + 1 - plan.first_step) * size / (time.perf_counter() - started)
            if stop(index + 1, partial(_read, step.loss), speed):
                tally.settle()
                return True
        tally.settle()
        return False
    finally:
        tally.seconds += time.perf_counter() - started


def _read(value: Tensor) -> float:
    return to_host(value)[0]


def _step(t: StepParts, batch: Batch) -> StepNumbers:
    """One optimizer step; nothing in it waits for the device."""
    with t.runtime.autocast():
        out = t.model(batch.inputs)
    loss = gaussian_nll(out, batch.targets).mean()
    t.optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(t.scaler.scale(loss))
    t.scaler.unscale_(t.optimizer)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    distance = haversine_m(t.geo.degrees(split_output(out)[0].detach()), batch.positions)
    hits = (distance <= t.accuracy_radius_m).sum()
    numbers = StepNumbers(loss.detach(), norm, hits, distance.square().sum())
    return numbers if t.group is None else _global(t.group, numbers, len(batch.inputs))


def _global(group: Group, numbers: StepNumbers, samples: int) -> StepNumbers:
    """The global batch's numbers from each rank's equal share of `samples`: the mean
    loss over every sample, hits and squared distances summed, in one all-reduce that the
    host does not wait for. The gradient norm is every rank's already (DDP averages the
    gradients before clipping sees them)."""
    row = torch.stack(
        [numbers.loss.double() * samples, numbers.hits.double(), numbers.squared_distance.double()]
    )
    group.sum(row)
    return StepNumbers(row[0] / (samples * group.world_size), numbers.grad_norm, row[1], row[2])


def epoch_train_metrics(tally: Tally) -> dict[str, float | int | None]:
    """Per-sample means (RMSE in metres) over the epoch's steps; gradient norm per step."""
    n = max(tally.samples, 1)
    return {
        "train_loss": tally.loss_sum / n,
        "train_accuracy": tally.hits / n,
        "train_rmse_m": math.sqrt(tally.squared_distance_sum / n),
        "learning_rate": tally.learning_rate,
        "gradient_norm": tally.grad_norm_sum / tally.finite_norms if tally.finite_norms else None,
    }


VAL_QUANTILES = (0.5, 0.68, 0.95)


@torch.no_grad()
def validate(
    model: nn.Module,
    data: Split,
    runtime: Runtime,
    geo: Geo,
    batch_size: int,
    radius_m: float,
    epoch: int,
) -> dict[str, float]:
    """Epoch `epoch`'s (1-based) validation metrics on `data` (`N` samples); `{}` if N is 0.

    Loss is the mean NLL of normalised positions, distances and radii are metres, the
    accuracy and the calibration error shares (0..1). Raises FloatingPointError when the
    loss or a distance is NaN or infinite.
    """
    if len(data) == 0:
        return {}
    model.eval()
    rows = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        x, y = runtime.inputs(data.inputs[sl]), runtime.put(data.targets[sl])
        with runtime.autocast():
            out = model(x)
        rows.append(_val_rows(out, y, runtime.put(data.positions[sl]), geo))
    metrics = _val_metrics(torch.cat(rows).cpu(), radius_m)  # the pass's one host sync
    for name, key in (("loss", "val_loss"), ("distance", "val_rmse_m")):
        if not math.isfinite(metrics[key]):
            raise FloatingPointError(f"validation {name} became {metrics[key]} at epoch {epoch}")
    return metrics


def _val_rows(out: Tensor, target: Tensor, positions: Tensor, geo: Geo) -> Tensor:
    """Per sample `[B, 5]` float64: loss, distance (m), 1-sigma radius (m), inside 68 %,
    inside 1 sigma."""
    mean, log_var = split_output(out)
    distance = haversine_m(geo.degrees(mean), positions)
    inside = inside_68(out, target)
    loss = gaussian_nll(out, target)
    within_sigma = mahalanobis_sq(out, target) <= 1.0
    columns = [loss, distance, geo.sigma_radius_m(mean, log_var), inside, within_sigma]
    return torch.stack([c.double() for c in columns], dim=1)


def _val_metrics(rows: Tensor, radius_m: float) -> dict[str, float]:
    """Means, quantiles and shares over the `[N, 5]` rows of `_val_rows`."""
    loss, distance, sigma_radius, inside, within_sigma = rows.unbind(dim=1)
    levels = torch.tensor(VAL_QUANTILES, dtype=torch.float64)
    p50, p68, p95 = torch.quantile(distance, levels).tolist()
    return {
        "val_loss": loss.mean().item(),
        "val_accuracy": (distance <= radius_m).double().mean().item(),
        "val_distance_p50_m": p50,
        "val_distance_p68_m": p68,
        "val_distance_p95_m": p95,
        "val_rmse_m": distance.square().mean().sqrt().item(),
        "mean_predicted_uncertainty_m": sigma_radius.mean().item(),
        "uncertainty_calibration_error": abs(inside.mean().item() - CALIBRATION_SHARE),
        "val_inside_68": inside.mean().item(),
        "val_inside_1_sigma": within_sigma.mean().item(),
    }


# Of the device's free memory: the model, its optimizer and activations need the rest.
RESIDENT_SHARE = 0.25


class Batch(NamedTuple):
    """One batch where the model runs: inputs, normalised targets, true (lat, lon) degrees."""

    inputs: Tensor
    targets: Tensor
    positions: Tensor


def place(
    splits: tuple[Split, ...], runtime: Runtime, share: float = RESIDENT_SHARE
) -> tuple[Split, ...]:
    """The splits moved to the device if they fit `share` of its free memory, else as given."""
    if not runtime.cuda:
        return splits
    free, _ = torch.cuda.mem_get_info(runtime.device)
    if sum(t.nbytes for s in splits for t in (s.inputs, s.targets, s.positions)) > share * free:
        return splits
    return tuple(
        dataclasses.replace(
            s, **{k: getattr(s, k).to(runtime.device) for k in ("inputs", "targets", "positions")}
        )
        for s in splits
    )


def feed(data: Split, batches: Sequence[Tensor], runtime: Runtime) -> Iterator[Batch]:
    """`data`'s batches, given as host index tensors, on the device in order."""
    if not runtime.cuda:
        return (Batch(data.inputs[i], data.targets[i], data.positions[i]) for i in batches)
    if data.inputs.device == runtime.device:
        return _resident(data, batches, runtime)
    return _prefetched(data, batches, runtime)


def _resident(data: Split, batches: Sequence[Tensor], runtime: Runtime) -> Iterator[Batch]:
    if not batches:
        return
    order = runtime.put(torch.cat(list(batches)))  # one copy an epoch, not waited for
    for idx in torch.split(order, [len(b) for b in batches]):
        x, y, pos = (t.index_select(0, idx) for t in (data.inputs, data.targets, data.positions))
        yield Batch(runtime.inputs(x), y, pos)


def _prefetched(data: Split, batches: Sequence[Tensor], runtime: Runtime) -> Iterator[Batch]:
    if not batches:
        return
    side = torch.cuda.Stream(runtime.device)  # type: ignore[no-untyped-call]
    ahead = _copy(data, batches[0], runtime, side)
    for following in [*batches[1:], None]:
        batch, copied = ahead
        if following is not None:  # its copy overlaps this batch's step
            ahead = _copy(data, following, runtime, side)
        main = torch.cuda.current_stream(runtime.device)
        main.wait_event(copied)
        for t in batch:  # made on the side stream, used on the main one
            t.record_stream(main)
        yield batch


def _copy(
    data: Split, idx: Tensor, runtime: Runtime, side: torch.cuda.Stream
) -> tuple[Batch, torch.cuda.Event]:
    """Gather one batch on the host and start its copy on `side`; the event marks its end."""
    x, y, pos = data.inputs[idx], data.targets[idx], data.positions[idx]
    with torch.cuda.stream(side):
        batch = Batch(runtime.inputs(x), runtime.put(y), runtime.put(pos))
        copied = side.record_event()
    return batch, copied


STEP_DECAY, PLATEAU_DECAY, PLATEAU_PATIENCE, PLATEAU_FLOOR = 0.1, 0.5, 2, 1e-3


class LrSchedule:
    """cosine (to 0), step (x0.1 at each third of training), plateau (x0.5), none.

    Warmup ramps linearly over `warmup_epochs` (at most half the job's steps); plateau
    then halves the rate when the monitored loss has not improved for PLATEAU_PATIENCE
    epochs.
    """

    def __init__(
        self, kind: str, base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int
    ) -> None:
        self.kind, self.base_lr = kind, base_lr
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        # At most half the job warms up, so that every schedule still decays (a 1-epoch job
        # with the default warmup_epochs 1 would otherwise end at its peak rate).
        self.warmup_steps = min(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch // 2)
        self.plateau_factor, self.best, self.bad_epochs = 1.0, math.inf, 0

    def lr_at(self, epoch: int, step: int) -> float:
        """The rate for step `step` (0-based) of epoch `epoch` (1-based)."""
        index = (epoch - 1) * self.steps_per_epoch + step
        if index < self.warmup_steps:
            return self.base_lr * (index + 1) / self.warmup_steps
        return self.base_lr * self._decay(index)

    def _decay(self, index: int) -> float:
        if self.kind == "cosine":
            total = self.epochs * self.steps_per_epoch - self.warmup_steps
            progress = (index - self.warmup_steps) / max(total, 1)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return float(STEP_DECAY ** (index // self.steps_per_epoch // max(self.epochs // 3, 1)))
        if self.kind == "plateau":
            return self.plateau_factor
        return 1.0

    def apply(self, optimizer: Optimizer, epoch: int, step: int) -> float:
        lr = self.lr_at(epoch, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, epoch: int, monitored: float) -> None:
        """Feed the plateau schedule the epoch's monitored loss (after warmup)."""
        if self.kind != "plateau" or epoch * self.steps_per_epoch <= self.warmup_steps:
            return
        if monitored < self.best:
            self.best, self.bad_epochs = monitored, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > PLATEAU_PATIENCE:
            self.plateau_factor = max(self.plateau_factor * PLATEAU_DECAY, PLATEAU_FLOOR)
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_factor": self.plateau_factor, "best": self.best, "bad": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor = float(state["plateau_factor"])
        self.best, self.bad_epochs = float(state["best"]), int(state["bad"])
