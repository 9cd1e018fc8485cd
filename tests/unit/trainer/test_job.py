from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.trainer.checkpoints import load_model
from services.trainer.control import Checkpoint, Control, Metrics, Outcome, StartInfo, StepInfo
from services.trainer.job import METRIC_KEYS, run_training
from shared.config import JobConfig
from tests.unit.trainer.configs import tiny_config

TIMING = {"epoch_seconds", "epoch_duration_seconds", "samples_per_second"}


class ScriptedHooks:
    """Records everything; answers `check` from a script keyed by (epoch, step)."""

    def __init__(self, script: dict[tuple[int, int], Control] | None = None) -> None:
        self.script = script or {}
        self.starts: list[StartInfo] = []
        self.steps: list[StepInfo] = []
        self.epochs: list[tuple[Metrics, bool]] = []
        self.checkpoints: list[tuple[int, str, str]] = []

    def on_start(self, info: StartInfo) -> None:
        self.starts.append(info)

    def check(self, step: StepInfo) -> Control:
        self.steps.append(step)
        return self.script.get((step.epoch, step.step), Control.CONTINUE)

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self.epochs.append((metrics, is_best))
        self.on_checkpoint(checkpoint.epoch, checkpoint.uri, checkpoint.sha256)

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        assert Path(uri).is_file()
        self.checkpoints.append((epoch, uri, sha256))


def _untimed(hooks: ScriptedHooks) -> list[Metrics]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m, _ in hooks.epochs]


def _run(config: JobConfig, workdir: Path, hooks: ScriptedHooks, resume: str | None) -> Outcome:
    return run_training(config, workdir, hooks, Path(resume) if resume else None)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ScriptedHooks, Outcome]:
    workdir = tmp_path_factory.mktemp("straight")
    hooks = ScriptedHooks()
    return workdir, hooks, _run(tiny_config(), workdir, hooks, None)


def test_a_straight_run_reports_every_epoch(straight: tuple[Path, ScriptedHooks, Outcome]) -> None:
    workdir, hooks, outcome = straight
    assert hooks.starts == [StartInfo("cpu (fp32)", 96, 32, 0, 3, 6)]
    assert [s.step for s in hooks.steps] == [1, 2, 3, 4, 5, 6] * 3
    assert [tuple(m) for m, _ in hooks.epochs] == [METRIC_KEYS] * 3
    assert [m["epoch"] for m, _ in hooks.epochs] == [1, 2, 3]
    assert [c[0] for c in hooks.checkpoints] == [1, 2, 3]
    assert outcome.kind == "completed" and outcome.epoch == 3
    assert outcome.final_metrics == hooks.epochs[-1][0]
    assert outcome.model_uri == str((workdir / "model.pt").resolve())
    losses = [m["val_loss"] for m, _ in hooks.epochs]
    assert outcome.best_val_loss == min(v for v in losses if isinstance(v, float))


@pytest.mark.parametrize(("pause_epoch", "pause_step"), [(2, 3), (1, 6)])
def test_pause_and_resume_equals_the_straight_run(
    straight: tuple[Path, ScriptedHooks, Outcome], tmp_path: Path, pause_epoch: int, pause_step: int
) -> None:
    straight_dir, straight_hooks, straight_outcome = straight
    first = ScriptedHooks({(pause_epoch, pause_step): Control.PAUSE})
    paused = _run(tiny_config(), tmp_path, first, None)
    assert paused.kind == "paused" and paused.epoch == pause_step // 6 + pause_epoch - 1
    assert first.steps[-1] == StepInfo(
        pause_epoch, pause_step, 6, first.steps[-1].loss, first.steps[-1].samples_per_second
    )
    assert paused.checkpoint_uri == first.checkpoints[-1][1]
    assert not (tmp_path / "model.pt").exists()

    second = ScriptedHooks()
    resumed = _run(tiny_config(), tmp_path, second, paused.checkpoint_uri)
    assert second.starts[0].resumed_from_epoch == paused.epoch
    next_step = (pause_epoch + pause_step // 6, pause_step % 6 + 1)
    assert (second.steps[0].epoch, second.steps[0].step) == next_step
    assert _untimed(first) + _untimed(second) == _untimed(straight_hooks)
    assert [s.loss for s in first.steps + second.steps] == [s.loss for s in straight_hooks.steps]
    assert resumed.best_epoch == straight_outcome.best_epoch
    expected = load_model(straight_dir / "model.pt")[0].state_dict()
    for key, value in load_model(tmp_path / "model.pt")[0].state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_cancel_stops_at_the_step_boundary(tmp_path: Path) -> None:
    hooks = ScriptedHooks({(2, 2): Control.CANCEL})
    outcome = _run(tiny_config(), tmp_path, hooks, None)
    assert outcome.kind == "cancelled" and outcome.epoch == 1
    assert (hooks.steps[-1].epoch, hooks.steps[-1].step) == (2, 2)
    assert len(hooks.steps) == 6 + 2
    assert len(hooks.epochs) == 1 and len(hooks.checkpoints) == 1
    assert not (tmp_path / "model.pt").exists()


def test_without_validation_val_metrics_are_none(tmp_path: Path) -> None:
    hooks = ScriptedHooks()
    outcome = _run(tiny_config(validation_split=0.0, epochs=1), tmp_path, hooks, None)
    metrics = hooks.epochs[0][0]
    assert metrics["val_loss"] is None and metrics["val_distance_p50_m"] is None
    assert isinstance(metrics["train_loss"], float)
    assert outcome.kind == "completed" and outcome.best_val_loss is None
    assert outcome.best_epoch == 1


def test_early_stopping_ends_after_patience(tmp_path: Path) -> None:
    config = tiny_config(
        epochs=12, learning_rate=0.05, lr_scheduler="none", early_stop_patience=1,
        dataset={"kind": "synthetic", "samples": 48, "n_mels": 8, "frames": 8},
    )  # fmt: skip
    hooks = ScriptedHooks()
    outcome = _run(config, tmp_path, hooks, None)
    assert outcome.kind == "completed" and outcome.epoch < 12
    assert outcome.best_epoch == outcome.epoch - 1
    assert [best for _, best in hooks.epochs][-1] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _run(tiny_config(accelerator="gpu"), tmp_path, ScriptedHooks(), None)
