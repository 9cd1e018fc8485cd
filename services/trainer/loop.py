"""The plain PyTorch loop: one training epoch, one validation pass, kept apart from job code."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from services.trainer.model import CALIBRATION_SHARE, gaussian_nll, inside_68, split_output
from services.trainer.schedule import LrSchedule

EARTH_RADIUS_M = 6_371_008.8
METRES_PER_DEGREE = EARTH_RADIUS_M * math.pi / 180  # about 111,195 m of latitude


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
        x = x.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last)

    def put(self, t: Tensor) -> Tensor:
        return t.pin_memory().to(self.device, non_blocking=True) if self.cuda else t

    def describe(self) -> str:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.autocast_dtype]
        if not self.cuda:
            return f"cpu ({dtype})"
        return f"{self.device} {torch.cuda.get_device_name(self.device)} ({dtype})"


class DeviceUnavailableError(RuntimeError):
    """The job needs a device this trainer does not have: another trainer may run it."""


def resolve_runtime(accelerator: str, precision: str) -> Runtime:
    """CUDA when asked or available; autocast only there (CPU trains in fp32).
    DeviceUnavailableError for a GPU job where CUDA is not available."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise DeviceUnavailableError("accelerator 'gpu' requested but CUDA is not available here")
    if accelerator == "cpu" or not torch.cuda.is_available():
        return Runtime(torch.device("cpu"), None)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    return Runtime(torch.device("cuda", torch.cuda.current_device()), dtypes[precision])


@dataclass(frozen=True)
class Split:
    """One side of the data on the host: inputs, normalised targets, true degrees."""

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
        centre = torch.tensor(self.centre, dtype=torch.float64, device=normalised.device)
        scale = torch.tensor(self.scale, dtype=torch.float64, device=normalised.device)
        return normalised.double() * scale + centre

    def sigma_radius_m(self, mean: Tensor, log_var: Tensor) -> Tensor:
        """The predicted 1-sigma radius in metres, `[B]`, from normalised `[B, 2]` outputs.

        sigma_north = exp(log_var_lat / 2) * scale_lat * METRES_PER_DEGREE and
        sigma_east = exp(log_var_lon / 2) * scale_lon * METRES_PER_DEGREE * cos(lat), at
        the predicted latitude; the radius is sqrt(sigma_north^2 + sigma_east^2).
        """
        scale = torch.tensor(self.scale, dtype=torch.float64, device=mean.device)
        sigma_m = torch.exp(0.5 * log_var.double()) * scale * METRES_PER_DEGREE
        lat = torch.deg2rad(self.degrees(mean)[:, 0].clamp(-90.0, 90.0))
        east = sigma_m[:, 1] * torch.cos(lat)
        return torch.sqrt(sigma_m[:, 0].square() + east.square())


def haversine_m(a: Tensor, b: Tensor) -> Tensor:
    """Great-circle metres between `[..., 2]` (lat, lon) degree tensors."""
    lat1, lon1, lat2, lon2 = (
        torch.deg2rad(v) for v in (a[..., 0], a[..., 1], b[..., 0], b[..., 1])
    )
    dlat, dlon = (lat2 - lat1) / 2, (lon2 - lon1) / 2
    h = torch.sin(dlat) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin(dlon) ** 2
    return 2 * EARTH_RADIUS_M * torch.asin(torch.sqrt(h.clamp(0.0, 1.0)))


# One step's mean loss, pre-clipping gradient norm, hits and summed squared metres.
StepResult = tuple[float, float, int, float]


@dataclass
class Tally:
    """Running sums of one training epoch; saved in a mid-epoch checkpoint."""

    samples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    hits: int = 0
    grad_norm_sum: float = 0.0
    finite_norms: int = 0
    learning_rate: float = 0.0
    seconds: float = 0.0
    squared_distance_sum: float = 0.0  # metres^2; 0 in tallies saved before it existed

    def add(self, samples: int, step: StepResult) -> None:
        """Count one step of `samples` samples."""
        loss, grad_norm, hits, squared_distance = step
        self.samples, self.steps, self.hits = (
            self.samples + samples,
            self.steps + 1,
            self.hits + hits,
        )
        self.loss_sum += loss * samples
        self.squared_distance_sum += squared_distance
        if math.isfinite(grad_norm):  # fp16 steps skipped for overflow have none
            self.grad_norm_sum, self.finite_norms = (
                self.grad_norm_sum + grad_norm,
                self.finite_norms + 1,
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Trainer:
    """What a training step needs besides the batch."""

    model: nn.Module
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    schedule: LrSchedule
    runtime: Runtime
    geo: Geo
    max_grad_norm: float | None
    accuracy_radius_m: float


StopAfter = Callable[[int, float, float], bool]


@dataclass(frozen=True)
class EpochPlan:
    """Epoch `epoch` (1-based) runs `batches` (index tensors) from `first_step` on."""

    epoch: int
    batches: list[Tensor]
    first_step: int = 0


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // min(batch_size, n)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """This epoch's shuffled batches, drawn from (seed, epoch) alone so a resume sees them too.

    The remainder is dropped (a different one each epoch) so no batch is a lone sample.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    size = min(batch_size, n)
    return list(torch.split(order[: steps_per_epoch(n, batch_size) * size], size))


def train_one_epoch(
    t: Trainer, data: Split, plan: EpochPlan, tally: Tally, stop: StopAfter
) -> bool:
    """Train on the plan's batches, updating `tally`; True if `stop` said so.

    `stop(steps_done, loss, samples_per_second)` is asked after every step.
    """
    t.model.train()
    started = time.perf_counter()
    try:
        for index in range(plan.first_step, len(plan.batches)):
            idx = plan.batches[index]
            tally.learning_rate = t.schedule.apply(t.optimizer, plan.epoch, index)
            step = _step(t, data, idx)
            tally.add(len(idx), step)
            done = index + 1 - plan.first_step
            if stop(index + 1, step[0], done * len(idx) / (time.perf_counter() - started)):
                return True
        return False
    finally:
        tally.seconds += time.perf_counter() - started


def _step(t: Trainer, data: Split, idx: Tensor) -> StepResult:
    x, y = t.runtime.inputs(data.inputs[idx]), t.runtime.put(data.targets[idx])
    pos = t.runtime.put(data.positions[idx])
    with t.runtime.autocast():
        out = t.model(x)
    loss = gaussian_nll(out, y).mean()
    t.optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(t.scaler.scale(loss))
    t.scaler.unscale_(t.optimizer)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    distance = haversine_m(t.geo.degrees(split_output(out)[0].detach()), pos)
    hits = (distance <= t.accuracy_radius_m).sum().double()
    stacked = [loss.detach().double(), norm.double(), hits, distance.square().sum()]
    values = torch.stack(stacked).tolist()  # the step's one host sync
    if not math.isfinite(values[0]):
        raise FloatingPointError(f"training loss became {values[0]}")
    return values[0], values[1], int(values[2]), values[3]


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
        rows.append(_val_rows(out, y, runtime.put(data.positions[sl]), geo).cpu())
    metrics = _val_metrics(torch.cat(rows), radius_m)
    for name, key in (("loss", "val_loss"), ("distance", "val_rmse_m")):
        if not math.isfinite(metrics[key]):
            raise FloatingPointError(f"validation {name} became {metrics[key]} at epoch {epoch}")
    return metrics


def _val_rows(out: Tensor, target: Tensor, positions: Tensor, geo: Geo) -> Tensor:
    """Per sample `[B, 4]` float64: loss, distance (m), 1-sigma radius (m), inside 68 %."""
    mean, log_var = split_output(out)
    distance = haversine_m(geo.degrees(mean), positions)
    inside = inside_68(out, target)
    loss = gaussian_nll(out, target)
    columns = [loss, distance, geo.sigma_radius_m(mean, log_var), inside]
    return torch.stack([c.double() for c in columns], dim=1)


def _val_metrics(rows: Tensor, radius_m: float) -> dict[str, float]:
    """Means, quantiles and shares over the `[N, 4]` rows of `_val_rows`."""
    loss, distance, sigma_radius, inside = rows.unbind(dim=1)
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
    }
