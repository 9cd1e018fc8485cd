"""The model really learns where transmitters are: far better than any constant guess, near
a kNN on the receiver powers, with honest uncertainty. The default recipe at a reduced size:
fresh synthetic samples each epoch, the best epoch shipped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import Tensor

from services.trainer.baselines import baseline_metrics
from services.trainer.checkpoints import load_model
from services.trainer.control import NullHooks, Outcome
from services.trainer.dataset import RFData, haversine_m, load_dataset, split_indices
from services.trainer.job import run_training
from services.trainer.model import inside_68
from shared.config import JobConfig

# The default job (default optimiser, schedule, warmup, seed and split) at a reduced size:
# 512 samples of 16 x 16 maps for 8 epochs instead of 2,048 of 64 x 32 for 10. Measured at
# full size: last epoch 1.09x the kNN, 0.73 inside the 68 % region (README).
CONFIG = JobConfig.model_validate(
    {
        "epochs": 8,
        "accelerator": "cpu",
        "dataset": {"kind": "synthetic", "samples": 512, "n_mels": 16, "frames": 16, "seed": 0},
    }
)


class Trained(NamedTuple):
    outcome: Outcome
    data: RFData
    train: NDArray[np.int64]
    val: NDArray[np.int64]
    out: Tensor  # the shipped model's raw outputs on the validation maps
    meta: dict[str, Any]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    outcome = run_training(CONFIG, tmp_path_factory.mktemp("learning"), NullHooks())
    data = load_dataset(CONFIG.dataset)
    train, val = split_indices(len(data.positions), CONFIG.validation_split, CONFIG.seed)
    model, meta = load_model(Path(str(outcome.model_uri)))
    with torch.no_grad():
        out = model(torch.from_numpy(data.inputs[val]))
    return Trained(outcome, data, train, val, out, meta)


def test_validation_error_is_far_below_the_best_constant_guess(trained: Trained) -> None:
    data, meta = trained.data, trained.meta
    truth = data.positions[trained.val]
    guesses = [np.array(data.centre), data.positions[trained.train].mean(axis=0)]
    baseline = min(float(np.median(haversine_m(g[None, :], truth))) for g in guesses)

    normalised = trained.out[:, :2].double().numpy()
    scale, centre = meta["normalisation"]["scale"], meta["normalisation"]["centre"]
    p50 = float(np.median(haversine_m(normalised * np.array(scale) + centre, truth)))

    print(f"p50 {p50 / 1000:.1f} km, best constant guess {baseline / 1000:.1f} km")
    assert meta["metrics"]["val_distance_p50_m"] == pytest.approx(p50, rel=1e-6)  # shipped
    assert p50 < 0.6 * baseline


def test_the_last_epoch_is_within_1_3x_of_a_knn_on_receiver_powers(trained: Trained) -> None:
    """What the data holds: a kNN on the 7 powers read from the maps, on the same split.
    Fixed training samples (before fresh ones each epoch) ended near 1.5x at full size."""
    knn = baseline_metrics(trained.data, trained.train, trained.val)["knn"]["p50_m"]
    last = float(trained.outcome.final_metrics["val_distance_p50_m"] or 0)
    print(f"last epoch p50 {last / 1000:.1f} km, kNN {knn / 1000:.1f} km")
    assert last <= 1.3 * knn


def test_the_shipped_models_68_percent_region_holds_about_68_percent(trained: Trained) -> None:
    """0.60..0.76 at full size; on this split's 102 samples the share itself varies by
    sqrt(0.68 * 0.32 / 102) = 0.046, so the window widens by two of those."""
    targets = torch.from_numpy(trained.data.normalise(trained.data.positions[trained.val]))
    share = float(inside_68(trained.out, targets.float()).double().mean())
    noise = 2 * math.sqrt(0.68 * 0.32 / len(trained.val))
    print(f"inside the predicted 68 % region: {share:.3f} (window +-{noise:.3f})")
    assert 0.60 - noise <= share <= 0.76 + noise
