"""The baselines read each receiver's power from its map and rank as a radio engineer expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.trainer.baselines import (
    POWER_FLOOR_DB,
    baseline_fields,
    baseline_metrics,
    receiver_powers_db,
)
from services.trainer.control import Checkpoint, Metrics, NullHooks
from services.trainer.dataset import DB_SCALE, _maps, split_indices, synthesise
from services.trainer.job import run_training
from shared.config import SyntheticDataset
from tests.unit.trainer.configs import tiny_config

# 1 dB of slack: fading averaged over the frames adds about +0.46 dB (lognormal, 2 dB).
SLACK_DB = 1.0


def test_powers_are_read_from_the_maps_to_a_fraction_of_the_shadowing() -> None:
    rng = np.random.default_rng(0)
    snr_db = rng.uniform(8.0, 40.0, (64, 7))
    maps = _maps(rng, snr_db, rng.uniform(0.2, 0.8, 64) * 32, n_mels=32, frames=32)
    read = receiver_powers_db(maps)
    assert read.shape == (64, 7)
    assert np.abs(read - snr_db).max() < SLACK_DB + 1.0
    assert abs(float(np.median(read - snr_db))) < SLACK_DB


def test_a_receiver_that_hears_nothing_reads_the_floor() -> None:
    noise = np.zeros((2, 3, 16, 8), dtype=np.float32)  # 0 dB above the floor: noise alone
    noise[0, 1, 5] = 30 / DB_SCALE  # 30 dB in band 5 on one receiver
    read = receiver_powers_db(noise)
    assert read[0, 1] > 29.0 and read[1].tolist() == [POWER_FLOOR_DB] * 3


def test_knn_beats_the_centroid_which_beats_the_centre() -> None:
    data = synthesise(SyntheticDataset(samples=1024, n_mels=16, frames=16, seed=1))
    train, val = split_indices(1024, 0.2, 42)
    found = baseline_metrics(data, train, val)
    assert set(found) == {"centre", "centroid", "knn"}
    p50 = {name: row["p50_m"] for name, row in found.items()}
    assert p50["knn"] < 0.8 * p50["centroid"] < 0.8 * 0.6 * p50["centre"]
    assert all(row["p50_m"] < row["p68_m"] < row["p95_m"] for row in found.values())
    assert baseline_metrics(data, train, val[:0]) == {}


class _Epochs(NullHooks):
    def __init__(self) -> None:
        self.metrics: list[Metrics] = []

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self.metrics.append(metrics)


def test_every_epoch_records_the_baselines_of_its_split(tmp_path: Path) -> None:
    config = tiny_config(epochs=2)
    hooks = _Epochs()
    run_training(config, tmp_path, hooks)
    data = synthesise(SyntheticDataset.model_validate(config.dataset.model_dump()))
    want = baseline_fields(data, *split_indices(128, config.validation_split, config.seed))
    assert len(want) == 9
    assert all({k: m[k] for k in want} == want for m in hooks.metrics)
