from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.trainer.dataset import (
    RECEIVERS,
    haversine_m,
    load_dataset,
    read_dataset,
    split_indices,
    synthesise,
    write_dataset,
)
from services.trainer.loop import haversine_m as torch_haversine_m
from shared.config import FilesDataset, SyntheticDataset

SMALL = SyntheticDataset(samples=256, receivers=7, n_mels=32, frames=16, seed=5)


def test_synthetic_data_is_deterministic_in_its_seed() -> None:
    a, b = synthesise(SMALL), synthesise(SMALL)
    other = synthesise(SMALL.model_copy(update={"seed": 6}))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.positions, other.positions)
    assert a.inputs.shape == (256, 7, 32, 16) and a.inputs.dtype == np.float32
    assert a.positions.shape == (256, 2) and a.positions.dtype == np.float64


def test_each_draw_is_deterministic_and_new() -> None:
    """Epoch k trains on draw k: the same on a resume, never the dataset's own samples."""
    a, b = synthesise(SMALL, draw=3, samples=64), synthesise(SMALL, draw=3, samples=64)
    other, dataset = synthesise(SMALL, draw=4, samples=64), synthesise(SMALL)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.positions, b.positions)
    assert a.inputs.shape == (64, 7, 32, 16) and (a.centre, a.scale) == (
        dataset.centre,
        dataset.scale,
    )
    for seen in (other.positions, dataset.positions):
        assert not np.isin(a.positions[:, 0], seen[:, 0]).any()


def test_config_takes_the_first_receivers() -> None:
    data = synthesise(SMALL.model_copy(update={"receivers": 3}))
    assert data.receiver_names == tuple(r.name for r in RECEIVERS[:3])
    assert data.inputs.shape[1] == 3


def test_transmitters_spread_over_the_region_around_the_receivers() -> None:
    data = synthesise(SMALL)
    normalised = data.normalise(data.positions)
    assert np.abs(normalised).max() <= 1.0
    assert (data.positions.min(axis=0) < data.receivers.min(axis=0)).all()
    assert (data.positions.max(axis=0) > data.receivers.max(axis=0)).all()


def test_nearer_receivers_hear_the_transmitter_louder() -> None:
    data = synthesise(SMALL)
    distance = haversine_m(data.positions[:, None, :], data.receivers[None, :, :])
    peak = data.inputs.mean(axis=3).max(axis=2)
    rows = np.arange(len(peak))
    near, far = peak[rows, distance.argmin(axis=1)], peak[rows, distance.argmax(axis=1)]
    assert near.mean() > far.mean() + 1.0
    assert (near > far).mean() > 0.9
    assert np.corrcoef(np.log(distance).ravel(), peak.ravel())[0, 1] < -0.7


def test_signal_band_moves_between_samples() -> None:
    data = synthesise(SMALL)
    band = data.inputs.mean(axis=(1, 3)).argmax(axis=1)
    assert band.std() > 2.0


def test_haversine_knows_turin_to_milan_in_numpy_and_torch() -> None:
    torino = np.array([45.0703, 7.6869])
    milano = np.array([45.4642, 9.1900])
    metres = float(haversine_m(torino, milano))
    assert 124_000 < metres < 128_000
    as_torch = torch_haversine_m(torch.from_numpy(torino), torch.from_numpy(milano))
    assert float(as_torch) == pytest.approx(metres, rel=1e-9)


def test_files_round_trip(tmp_path: Path) -> None:
    written = write_dataset(tmp_path / "ds", SMALL)
    back = load_dataset(FilesDataset(kind="files", path=str(written)))
    original = synthesise(SMALL)
    assert np.array_equal(back.inputs, original.inputs)
    assert np.array_equal(back.positions, original.positions)
    assert np.array_equal(back.receivers, original.receivers)
    assert back.receiver_names == original.receiver_names
    assert (back.centre, back.scale) == (original.centre, original.scale)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds", SyntheticDataset(samples=16, n_mels=8, frames=8))


def test_missing_file_is_named(dataset_dir: Path) -> None:
    (dataset_dir / "inputs.npy").unlink()
    with pytest.raises(ValueError, match=r"inputs\.npy"):
        read_dataset(dataset_dir)


def test_positions_of_the_wrong_shape_are_refused(dataset_dir: Path) -> None:
    np.save(dataset_dir / "positions.npy", np.zeros((15, 2)))
    with pytest.raises(ValueError, match=r"positions\.npy.*\(15, 2\)"):
        read_dataset(dataset_dir)


def test_receiver_count_must_match_the_inputs(dataset_dir: Path) -> None:
    sites = json.loads((dataset_dir / "receivers.json").read_text())
    (dataset_dir / "receivers.json").write_text(json.dumps(sites[:3]))
    with pytest.raises(ValueError, match=r"7 receivers, receivers\.json has 3"):
        read_dataset(dataset_dir)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("inputs.npy", np.zeros((16, 7, 8), np.float32), "4-d float"),
        ("inputs.npy", np.full((16, 7, 8, 8), np.nan, np.float32), "NaN"),
        ("positions.npy", np.full((16, 2), 500.0), "out of range"),
        ("receivers.json", '[{"name": "x"}]', "name, lat, lon"),
        ("receivers.json", "not json", "name, lat, lon"),
    ],
)
def test_bad_contents_give_clear_errors(
    dataset_dir: Path, name: str, content: str | np.ndarray, message: str
) -> None:
    if isinstance(content, str):
        (dataset_dir / name).write_text(content)
    else:
        np.save(dataset_dir / name, content)
    with pytest.raises(ValueError, match=message) as error:
        read_dataset(dataset_dir)
    assert name in str(error.value)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        read_dataset(tmp_path / "nowhere")


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, val = split_indices(100, 0.2, seed=1)
    again = split_indices(100, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 20 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(100))
    assert not np.array_equal(val, split_indices(100, 0.2, seed=2)[1])
    no_val_train, no_val = split_indices(100, 0.0, seed=1)
    assert len(no_val) == 0 and len(no_val_train) == 100
