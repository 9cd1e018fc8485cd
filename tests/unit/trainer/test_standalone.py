from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from services.trainer.checkpoints import load_model
from services.trainer.control import Control, NullHooks, StepInfo
from services.trainer.dataset import write_dataset
from services.trainer.job import run_training
from services.trainer.standalone import (
    ConfigFileError,
    ConsoleHooks,
    load_job_config,
    train_from_file,
)
from shared.config import SyntheticDataset

JOB = """
epochs: 2
batch_size: 8
model_architecture: resnet18
accelerator: cpu
lr_scheduler: step
dataset:
  kind: files
  path: {path}
"""


def test_a_yaml_job_on_a_files_dataset_writes_checkpoints_and_model(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", SyntheticDataset(samples=40, n_mels=8, frames=8))
    config = tmp_path / "job.yaml"
    config.write_text(JOB.format(path=data))
    out = io.StringIO()

    outcome = train_from_file(config, tmp_path / "artifacts", Console(file=out, width=200))

    assert outcome.kind == "completed" and outcome.epoch == 2
    names = sorted(p.name for p in (tmp_path / "artifacts" / "checkpoints" / "attempt-1").iterdir())
    assert names == ["epoch-0001.pt", "epoch-0002.pt"]
    model, meta = load_model(tmp_path / "artifacts" / "model.pt")
    assert meta["config"]["model_architecture"] == "resnet18"
    assert model(torch.zeros(1, 7, 8, 8)).shape == (1, 4)
    printed = out.getvalue()
    assert "epoch 1" in printed and "epoch 2" in printed and "val_distance_p50_m=" in printed


def test_json_configs_are_read_too(tmp_path: Path) -> None:
    config = tmp_path / "job.json"
    config.write_text('{"epochs": 4, "model_architecture": "resnet18"}')
    assert load_job_config(config).epochs == 4


def test_an_invalid_config_names_each_bad_field(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"epochs": 0, "model_architecture": "resnet18x", "nope": 1}))
    with pytest.raises(ConfigFileError) as error:
        load_job_config(config)
    message = str(error.value)
    assert "epochs:" in message and "did you mean resnet18" in message and "nope:" in message


@pytest.mark.parametrize("content", ["epochs: [1", "- just\n- a list\n"])
def test_unreadable_files_are_refused(tmp_path: Path, content: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(content)
    with pytest.raises(ConfigFileError, match=r"job\.yaml"):
        load_job_config(config)


def test_ctrl_c_pauses_then_a_second_one_cancels() -> None:
    hooks = ConsoleHooks(Console(file=io.StringIO()))
    step = StepInfo(1, 1, 6, 0.0, 1.0)
    answers = [hooks.check(step)]
    for _ in range(2):
        hooks.interrupt(signal.SIGINT, None)
        answers.append(hooks.check(step))
    assert answers == [Control.CONTINUE, Control.PAUSE, Control.CANCEL]


class _PauseAtOnce(NullHooks):
    def check(self, step: StepInfo) -> Control:
        return Control.PAUSE


def test_a_paused_job_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    fields = {"epochs": 2, "batch_size": 8, "model_architecture": "resnet18", "accelerator": "cpu"}
    fields["dataset"] = {"kind": "synthetic", "samples": 40, "n_mels": 8, "frames": 8}
    config.write_text(yaml.safe_dump(fields))
    paused = run_training(load_job_config(config), tmp_path / "a", _PauseAtOnce())
    assert paused.kind == "paused" and paused.checkpoint_uri is not None

    out = io.StringIO()
    console = Console(file=out, width=200)
    outcome = train_from_file(config, tmp_path / "a", console, Path(paused.checkpoint_uri))
    assert outcome.kind == "completed" and outcome.epoch == 2
    assert "epochs 1..2" in out.getvalue() and (tmp_path / "a" / "model.pt").is_file()


def test_train_draws_a_bar_over_each_epochs_steps_and_ends_once(tmp_path: Path) -> None:
    """On a terminal: a step bar per epoch, each epoch's metrics printed once, one end line."""
    config = tmp_path / "job.yaml"
    fields = {"epochs": 2, "batch_size": 4, "model_architecture": "resnet18", "accelerator": "cpu"}
    fields["dataset"] = {"kind": "synthetic", "samples": 40, "n_mels": 8, "frames": 8}
    config.write_text(yaml.safe_dump(fields))
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    train_from_file(config, tmp_path / "a", console)
    printed = out.getvalue()
    assert "━" in printed and "epoch 1/2" in printed and "epoch 2/2" in printed
    assert "/8 steps" in printed  # 32 training samples in batches of 4
    assert printed.count("[bold]") == 0 and printed.count("completed after") == 1
    assert sum("val_loss=" in line for line in printed.splitlines()) == 2
