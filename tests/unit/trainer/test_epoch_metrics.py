"""Every field of `EpochMetrics` is recorded, each computed as its description says."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from services.trainer.control import Checkpoint, Metrics, NullHooks
from services.trainer.dataset import haversine_m
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
    train_one_epoch,
    validate,
)
from services.trainer.model import CHI2_2DOF_68, Localiser, build_model
from shared.config import JobConfig
from shared.readmodel.shapes import EpochMetrics
from tests.unit.trainer.configs import tiny_config

CPU = Runtime(torch.device("cpu"), None)
GEO = Geo(centre=(60.0, 10.0), scale=(0.5, 1.0))
METRES_PER_DEGREE = 111_195.08
VALIDATION_ONLY = {
    "val_loss", "val_accuracy", "val_distance_p50_m", "val_distance_p68_m",
    "val_distance_p95_m", "val_rmse_m", "mean_predicted_uncertainty_m",
    "uncertainty_calibration_error", "val_inside_68", "val_inside_1_sigma",
    *(name for name in EpochMetrics.model_fields if name.startswith("baseline_")),
}  # fmt: skip


class EpochLog(NullHooks):
    """Keeps each epoch's metrics."""

    def __init__(self) -> None:
        self.epochs: list[Metrics] = []

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self.epochs.append(metrics)


class Passthrough(nn.Module):
    """Outputs its `[B, 4]` inputs; its one weight gets a zero gradient and stays 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0 * self.weight


def _split(outputs: list[list[float]], targets: list[list[float]]) -> Split:
    """A split whose Passthrough predictions are `outputs` and truths `targets` (normalised)."""
    y = torch.tensor(targets, dtype=torch.float32)
    return Split(torch.tensor(outputs, dtype=torch.float32), y, GEO.degrees(y))


def _random_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    outputs = torch.cat([torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) - 2], 1)
    return _split(outputs.tolist(), torch.randn(n, 2, generator=g).tolist())


def _distances_m(data: Split) -> Any:
    """Independent great-circle metres (numpy) between predictions and truths."""
    predicted = data.inputs[:, :2].double().numpy() * np.array(GEO.scale) + np.array(GEO.centre)
    return haversine_m(predicted, data.positions.numpy())


def _float(value: float | int | None) -> float:
    assert isinstance(value, float)
    return value


def _validate(data: Split) -> dict[str, float]:
    return validate(Passthrough(), data, CPU, GEO, 4, 5000.0, 1)


@pytest.mark.parametrize(("validation_split", "epochs"), [(0.25, 2), (0.0, 1)])
def test_each_epoch_records_exactly_the_declared_fields(
    tmp_path: Path, validation_split: float, epochs: int
) -> None:
    hooks = EpochLog()
    config = tiny_config(epochs=epochs, validation_split=validation_split)
    run_training(config, tmp_path, hooks)
    assert len(hooks.epochs) == epochs
    for metrics in hooks.epochs:
        assert tuple(metrics) == tuple(EpochMetrics.model_fields)
        EpochMetrics.model_validate(metrics)
        missing = {k for k, v in metrics.items() if v is None}
        assert missing == (VALIDATION_ONLY if validation_split == 0 else set())
        assert _float(metrics["epoch_duration_seconds"]) >= _float(metrics["epoch_seconds"])


def test_train_rmse_is_the_root_mean_square_distance_of_the_epoch() -> None:
    data, model = _random_split(12, seed=1), Passthrough()
    trainer = StepParts(
        model, torch.optim.AdamW(model.parameters(), lr=1e-3),
        torch.amp.GradScaler("cpu", enabled=False), LrSchedule("none", 1e-3, 1, 3, 0),
        CPU, GEO, None, 5000.0,
    )  # fmt: skip
    tally, plan = Tally(), EpochPlan(1, epoch_batches(12, 4, 0, 1))
    train_one_epoch(trainer, data, plan, tally, lambda *_: False)
    expected = math.sqrt(float(np.mean(_distances_m(data) ** 2)))
    assert epoch_train_metrics(tally)["train_rmse_m"] == pytest.approx(expected, rel=1e-9)


def test_a_tally_saved_before_the_rmse_existed_still_loads() -> None:
    saved = {k: v for k, v in Tally(samples=4, steps=1).as_dict().items() if "distance" not in k}
    assert Tally(**saved).squared_distance_sum == 0.0


def test_validation_quantiles_are_those_of_the_distances() -> None:
    data = _random_split(23, seed=2)
    distances = _distances_m(data)
    metrics = _validate(data)
    p50, p68, p95 = np.percentile(distances, [50, 68, 95])
    assert metrics["val_distance_p50_m"] == pytest.approx(p50, rel=1e-9)
    assert metrics["val_distance_p68_m"] == pytest.approx(p68, rel=1e-9)
    assert metrics["val_distance_p95_m"] == pytest.approx(p95, rel=1e-9)
    rmse = math.sqrt(float(np.mean(distances**2)))
    assert metrics["val_rmse_m"] == pytest.approx(rmse, rel=1e-9)


def test_predicted_uncertainty_is_the_mean_one_sigma_radius_in_metres() -> None:
    # At latitude 60 a degree of longitude is half as long; sigmas are normalised units.
    log_vars = [(math.log(0.04), math.log(0.01)), (0.0, 0.0)]
    data = _split([[0.0, 0.0, *lv] for lv in log_vars], [[0.0, 0.0]] * 2)
    radii = []
    for lv_lat, lv_lon in log_vars:
        north = math.exp(lv_lat / 2) * GEO.scale[0] * METRES_PER_DEGREE
        east = math.exp(lv_lon / 2) * GEO.scale[1] * METRES_PER_DEGREE * 0.5
        radii.append(math.hypot(north, east))
    assert radii[0] == pytest.approx(math.hypot(11_119.5, 5_559.75), rel=1e-6)
    metrics = _validate(data)
    assert metrics["mean_predicted_uncertainty_m"] == pytest.approx(sum(radii) / 2, rel=1e-6)


def test_the_68_percent_region_holds_68_percent_of_gaussian_draws() -> None:
    draws = torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0))
    share = (draws.square().sum(dim=1) <= CHI2_2DOF_68).double().mean().item()
    assert pytest.approx(2.2789, abs=1e-4) == CHI2_2DOF_68
    assert share == pytest.approx(0.68, abs=0.003)


def test_calibration_error_counts_the_truths_inside_the_68_percent_region() -> None:
    # Variance 4 on both axes: an offset of 2 * sqrt(m) has squared Mahalanobis distance m.
    mahalanobis_sq = [1.0, 2.2, 2.27, 2.29, 3.0, 5.0, 8.0, 10.0, 0.5, 2.5]
    inside = sum(m <= 2.2788 for m in mahalanobis_sq)
    log_var = math.log(4.0)
    outputs = [[2 * math.sqrt(m), 0.0, log_var, log_var] for m in mahalanobis_sq]
    metrics = _validate(_split(outputs, [[0.0, 0.0]] * len(outputs)))
    assert inside == 4
    assert metrics["uncertainty_calibration_error"] == pytest.approx(abs(4 / 10 - 0.68))
    assert metrics["val_inside_68"] == pytest.approx(4 / 10)
    assert metrics["val_inside_1_sigma"] == pytest.approx(2 / 10)  # m = 1.0 and 0.5


class BrokenOnEval(nn.Module):
    """Trains as `inner` does; in eval mode its predicted positions become `value`."""

    def __init__(self, inner: nn.Module, value: float) -> None:
        super().__init__()
        self.inner, self.value = inner, value

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        if self.training:
            return out
        return torch.cat([torch.full_like(out[:, :2], self.value), out[:, 2:]], dim=1)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_validation_pass_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    def broken(config: JobConfig, in_chans: int, size: tuple[int, int]) -> Localiser:
        return BrokenOnEval(build_model(config, in_chans, size), value)  # type: ignore[return-value]

    monkeypatch.setattr("services.trainer.job.build_model", broken)
    hooks = EpochLog()
    with pytest.raises(FloatingPointError, match=f"validation loss became {value} at epoch 1"):
        run_training(tiny_config(epochs=2), tmp_path, hooks)
    assert hooks.epochs == []
