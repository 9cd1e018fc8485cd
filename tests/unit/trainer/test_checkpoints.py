from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from services.trainer.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    Progress,
    Stateful,
    atomic_save,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
    save_model,
)
from services.trainer.dataset import synthesise
from services.trainer.loop import LrSchedule
from services.trainer.model import build_model, gaussian_nll
from shared.config import JobConfig, SyntheticDataset
from tests.unit.trainer.configs import tiny_config


def _parts(config: JobConfig, seed: int) -> Stateful:
    torch.manual_seed(seed)
    model = build_model(config, in_chans=7, input_size=(16, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = LrSchedule("plateau", 1e-3, epochs=5, steps_per_epoch=4, warmup_epochs=0)
    return Stateful(model, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False))


def _train_a_step(parts: Stateful) -> None:
    loss = gaussian_nll(parts.model(torch.randn(4, 7, 16, 16)), torch.zeros(4, 2)).mean()
    torch.autograd.backward(loss)
    parts.optimizer.step()
    parts.schedule.end_epoch(1, 3.0)


def test_atomic_save_returns_the_files_sha256_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.pt"
    digest = atomic_save({"format_version": FORMAT_VERSION, "a": torch.arange(3)}, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_a_failed_save_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    atomic_save({"format_version": FORMAT_VERSION}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        atomic_save({"format_version": FORMAT_VERSION, "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_checkpoint_restores_everything(tmp_path: Path) -> None:
    config = tiny_config()
    parts = _parts(config, seed=1)
    _train_a_step(parts)
    progress = Progress(2, 3, {"samples": 48}, 0.5, 1, 1, {"epoch": 2, "val_loss": 0.5})
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    path, digest = save_checkpoint(tmp_path, parts, progress, config)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    assert path.name == "epoch-0003-step-000003.pt"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()

    fresh = _parts(config, seed=2)
    assert load_checkpoint(path, fresh, config) == progress
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[key]), key
    assert str(fresh.optimizer.state_dict()) == str(parts.optimizer.state_dict())
    assert fresh.schedule.state_dict() == parts.schedule.state_dict()


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    config = tiny_config()
    path = tmp_path / "old.pt"
    atomic_save({"format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path, _parts(config, seed=1), config)


def test_a_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    config = tiny_config()
    path, _ = save_checkpoint(tmp_path, _parts(config, seed=1), Progress(epoch=1), config)
    other = tiny_config(learning_rate=0.5)
    with pytest.raises(CheckpointError, match="different job config"):
        load_checkpoint(path, _parts(other, seed=1), other)


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path, _parts(tiny_config(), seed=1), tiny_config())


def test_pruning_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    names = ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003-step-000004.pt", "epoch-0003.pt"]
    names += ["epoch-0004.pt"]
    for name in names:
        (tmp_path / name).touch()
    prune_checkpoints(tmp_path, keep=2, protect="epoch-0001.pt")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["epoch-0001.pt", "epoch-0003.pt", "epoch-0004.pt"]


def test_final_model_round_trip(tmp_path: Path) -> None:
    config = tiny_config()
    data = synthesise(SyntheticDataset(samples=16, n_mels=16, frames=16))
    model = _parts(config, seed=1).model.eval()
    path, _ = save_model(tmp_path / "model.pt", model, config, data, {"epoch": 3})
    loaded, meta = load_model(path)
    x = torch.from_numpy(data.inputs)
    assert torch.equal(loaded(x), model(x))
    assert meta["input_shape"] == [7, 16, 16]
    assert meta["receivers"][0]["name"] == data.receiver_names[0]
    assert meta["normalisation"] == {"centre": list(data.centre), "scale": list(data.scale)}


def test_a_checkpoint_that_changed_after_it_was_recorded_is_refused(tmp_path: Path) -> None:
    config = tiny_config()
    parts = _parts(config, seed=1)
    path, digest = save_checkpoint(tmp_path, parts, Progress(epoch=1), config)
    assert load_checkpoint(path, _parts(config, seed=2), config, digest).epoch == 1
    with path.open("r+b") as file:  # one flipped byte, as a bad disk or a stale writer
        file.seek(200)
        byte = file.read(1)
        file.seek(200)
        file.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, _parts(config, seed=2), config, digest)
