"""The model a user gets is the best one: `model.pt` holds the best epoch's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.trainer.checkpoints import load_model, read_payload
from services.trainer.control import Checkpoint, Control, Metrics, NullHooks, Outcome, StepInfo
from services.trainer.dataset import write_dataset
from services.trainer.job import run_training
from shared.config import JobConfig, SyntheticDataset
from tests.unit.trainer.configs import tiny_config


class Recorder(NullHooks):
    """Keeps each epoch's metrics and checkpoint; pauses once at `pause_at` (epoch, step)."""

    def __init__(self, pause_at: tuple[int, int] | None = None) -> None:
        self.epochs: list[tuple[Metrics, bool, Checkpoint]] = []
        self.pause_at = pause_at

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self.epochs.append((metrics, is_best, checkpoint))

    def check(self, step: StepInfo) -> Control:
        return Control.PAUSE if (step.epoch, step.step) == self.pause_at else Control.CONTINUE


@pytest.fixture(scope="module")
def overfitting(tmp_path_factory: pytest.TempPathFactory) -> JobConfig:
    """A fixed 64-sample files dataset, with a learning rate high enough that validation
    loss turns up again at the last epoch (4 of 5 is the best)."""
    folder = tmp_path_factory.mktemp("data")
    write_dataset(folder, SyntheticDataset(samples=64, n_mels=16, frames=16, seed=5))
    return tiny_config(
        epochs=5,
        learning_rate=1e-2,
        dropout_rate=0.0,
        warmup_epochs=0,
        lr_scheduler="none",
        dataset={"kind": "files", "path": str(folder)},
    )


@pytest.fixture(scope="module")
def straight(
    overfitting: JobConfig, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Recorder, Outcome]:
    workdir, hooks = tmp_path_factory.mktemp("straight"), Recorder()
    return workdir, hooks, run_training(overfitting, workdir, hooks)


def _weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = read_payload(path)[key]
    return state


def test_model_pt_holds_the_best_epochs_weights(straight: tuple[Path, Recorder, Outcome]) -> None:
    workdir, hooks, outcome = straight
    losses = [float(m["val_loss"] or 0) for m, _, _ in hooks.epochs]
    best = losses.index(min(losses)) + 1
    assert best < len(losses), f"the case needs a best epoch before the last: {losses}"
    assert outcome.best_epoch == best
    assert [is_best for _, is_best, _ in hooks.epochs][best - 1]

    shipped = _weights(workdir / "model.pt", "state_dict")
    at_best = _weights(Path(hooks.epochs[best - 1][2].uri), "model")
    last = _weights(Path(hooks.epochs[-1][2].uri), "model")
    assert all(torch.equal(shipped[k], v) for k, v in at_best.items())
    assert not all(torch.equal(shipped[k], v) for k, v in last.items())
    assert load_model(workdir / "model.pt")[1]["metrics"] == hooks.epochs[best - 1][0]


def test_a_paused_and_resumed_job_ships_the_same_best_weights(
    overfitting: JobConfig, straight: tuple[Path, Recorder, Outcome], tmp_path: Path
) -> None:
    workdir, _, outcome = straight
    assert outcome.best_epoch is not None and outcome.best_epoch < 5  # before the pause
    paused = run_training(overfitting, tmp_path, Recorder(pause_at=(5, 1)))
    assert paused.kind == "paused" and paused.checkpoint_uri
    resumed = run_training(
        overfitting, tmp_path, Recorder(), Path(paused.checkpoint_uri), attempt=2
    )
    assert resumed.best_epoch == outcome.best_epoch
    want = _weights(workdir / "model.pt", "state_dict")
    got = _weights(tmp_path / "model.pt", "state_dict")
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_without_validation_the_last_epoch_ships(tmp_path: Path) -> None:
    hooks = Recorder()
    config = tiny_config(
        epochs=2,
        validation_split=0.0,
        dataset={"kind": "synthetic", "samples": 32, "n_mels": 16, "frames": 16, "seed": 3},
    )
    outcome = run_training(config, tmp_path, hooks)
    assert outcome.best_epoch == 2
    shipped = _weights(tmp_path / "model.pt", "state_dict")
    last = _weights(Path(hooks.epochs[-1][2].uri), "model")
    assert all(torch.equal(shipped[k], v) for k, v in last.items())
