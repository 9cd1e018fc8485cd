"""The model really learns where transmitters are: far better than any constant guess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.trainer.checkpoints import load_model
from services.trainer.control import NullHooks
from services.trainer.dataset import haversine_m, load_dataset, split_indices
from services.trainer.job import run_training
from tests.unit.trainer.configs import tiny_config

CONFIG = tiny_config(
    epochs=6,
    batch_size=32,
    learning_rate=2e-3,
    dropout_rate=0.0,
    warmup_epochs=0,
    validation_split=0.2,
    seed=42,
    dataset={"kind": "synthetic", "samples": 1024, "n_mels": 32, "frames": 32, "seed": 0},
)


def test_validation_error_is_far_below_the_best_constant_guess(tmp_path: Path) -> None:
    outcome = run_training(CONFIG, tmp_path, NullHooks())
    data = load_dataset(CONFIG.dataset)
    train, val = split_indices(len(data.positions), CONFIG.validation_split, CONFIG.seed)
    truth = data.positions[val]
    guesses = [np.array(data.centre), data.positions[train].mean(axis=0)]
    baseline = min(float(np.median(haversine_m(g[None, :], truth))) for g in guesses)

    model, meta = load_model(Path(str(outcome.model_uri)))
    with torch.no_grad():
        out = model(torch.from_numpy(data.inputs[val]))[:, :2].double().numpy()
    predicted = out * np.array(meta["normalisation"]["scale"]) + meta["normalisation"]["centre"]
    p50 = float(np.median(haversine_m(predicted, truth)))

    print(f"p50 {p50 / 1000:.1f} km, best constant guess {baseline / 1000:.1f} km")
    assert outcome.final_metrics["val_distance_p50_m"] == pytest.approx(p50, rel=1e-6)
    assert p50 < 0.6 * baseline
