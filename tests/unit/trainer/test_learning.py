"""The model really learns where transmitters are: far better than any constant guess, near
a kNN on the receiver powers, with honest uncertainty. The default recipe at a reduced size:
fresh synthetic samples each epoch, the best epoch shipped."""

from __future__ import annotations

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

# The default job itself (JobConfig's defaults: 2,048 samples of 64 x 32 maps, 10 epochs
# of convnext_atto), on the CPU: about 80 s on two cores. A reduced size would not do: at
# 512 samples of 16 x 16 the old recipe (fixed samples, last epoch shipped) also passed
# the 1.3x test (1.27x), and the 68 % share drifts out of 0.60..0.76 (0.78).
CONFIG = JobConfig.model_validate({"accelerator": "cpu"})
pytestmark = pytest.mark.timeout(900)  # the one job, on a loaded CI machine


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
    Fixed training samples (before fresh ones each epoch) ended at 1.48x; now 1.12x."""
    knn = baseline_metrics(trained.data, trained.train, trained.val)["knn"]["p50_m"]
    last = float(trained.outcome.final_metrics["val_distance_p50_m"] or 0)
    print(f"last epoch p50 {last / 1000:.1f} km, kNN {knn / 1000:.1f} km")
    assert last <= 1.3 * knn


def test_the_shipped_models_68_percent_region_holds_about_68_percent(trained: Trained) -> None:
    """0.60..0.76 of the 410 validation truths inside the shipped model's predicted 68 %
    region (the old recipe's last epoch: 0.12, overconfident)."""
    targets = torch.from_numpy(trained.data.normalise(trained.data.positions[trained.val]))
    share = float(inside_68(trained.out, targets.float()).double().mean())
    print(f"inside the predicted 68 % region: {share:.3f}")
    assert 0.60 <= share <= 0.76
    assert trained.meta["metrics"]["val_inside_68"] == pytest.approx(share)
