"""A config that cannot run is refused at submit, naming the field and what to change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from pydantic import ValidationError

from services.api.preflight import MAX_DATASET_BYTES, PreflightError, preflight
from services.trainer.dataset import write_dataset
from services.trainer.model import load_backbone_weights
from shared.config import JobConfig, SyntheticDataset

SMALL = SyntheticDataset(samples=64, n_mels=16, frames=16)


def config(**fields: Any) -> JobConfig:
    return JobConfig.model_validate(fields)


def refusal(job: JobConfig, **limits: int) -> PreflightError:
    with pytest.raises(PreflightError) as caught:
        preflight(job, **limits)
    return caught.value


# The model: built for the dataset's maps, one training step's forward pass.


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model_architecture": "resnet18", "batch_size": 2},
        {"model_architecture": "convnext_atto", "batch_size": 1},
        {"model_architecture": "resnet18", "dataset": {"receivers": 1, "n_mels": 8, "frames": 8}},
        {"model_architecture": "vit_tiny_patch16_224", "dataset": {"n_mels": 224, "frames": 224}},
    ],
)
def test_a_config_that_can_run_passes(fields: dict[str, Any]) -> None:
    preflight(config(**fields))


def test_batch_norm_with_batch_size_1_is_refused() -> None:
    error = refusal(config(model_architecture="resnet18", batch_size=1))
    assert error.field == "batch_size"
    assert error.message == "batch_size 1: resnet18 uses batch norm; use 2 or more"


def test_a_fixed_size_model_on_other_maps_says_what_to_change() -> None:
    error = refusal(config(model_architecture="vit_tiny_patch16_224"))
    assert error.field == "model_architecture"
    assert "224x224" in error.message and "64x32" in error.message
    assert "dataset.n_mels: 224, dataset.frames: 224" in error.message


# The synthetic dataset must fit in memory.


def test_a_dataset_over_the_memory_bound_is_refused() -> None:
    big = config(dataset={"samples": 1_000_000, "n_mels": 512, "frames": 1024})
    error = refusal(big)
    assert error.field == "dataset"
    assert "14680064000000 bytes" in error.message and str(MAX_DATASET_BYTES) in error.message


def test_the_memory_bound_is_inclusive() -> None:
    job = config(dataset={"samples": 16, "receivers": 1, "n_mels": 8, "frames": 8})
    preflight(job, max_dataset_bytes=16 * 8 * 8 * 4)
    assert refusal(job, max_dataset_bytes=16 * 8 * 8 * 4 - 1).field == "dataset"


# Devices.


def test_a_batch_that_the_ranks_cannot_share_equally_is_refused() -> None:
    with pytest.raises(ValidationError, match="batch_size 16 is not a multiple of devices x"):
        config(devices=3, batch_size=16)
    with pytest.raises(ValidationError, match="devices x nodes = 6"):
        config(devices=3, nodes=2, batch_size=16)
    preflight(config(devices=2, batch_size=16))  # a torchrun group: two equal shares


# Local files: pretrained weights and a files dataset.


def test_a_text_file_as_pretrained_weights_is_refused_clearly(tmp_path: Path) -> None:
    text = tmp_path / "weights.pt"
    text.write_text("epochs: 3\n")  # torch.load says `KeyError: 101` (the "e")
    error = refusal(config(pretrained=True, pretrained_path=str(text)))
    assert error.field == "pretrained_path"
    assert "not a PyTorch checkpoint" in error.message and "KeyError" not in error.message


def test_the_trainers_loader_says_the_same(tmp_path: Path) -> None:
    text = tmp_path / "weights.pt"
    text.write_text("epochs: 3\n")
    backbone = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_backbone_weights(backbone, text)


def test_weights_of_another_model_are_refused_and_matching_ones_pass(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    preflight(config(model_architecture="resnet18", batch_size=2, pretrained_path=str(weights)))
    error = refusal(config(model_architecture="convnext_atto", pretrained_path=str(weights)))
    assert error.field == "pretrained_path" and "no weights match" in error.message


def files(path: Path) -> JobConfig:
    return config(dataset={"kind": "files", "path": str(path)})


def test_a_files_dataset_written_by_the_cli_passes(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "rf", SMALL.model_copy(update={"receivers": 3}))
    preflight(files(data))


def test_a_files_dataset_that_is_no_dataset_is_refused(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "rf", SMALL)
    assert "not a directory" in refusal(files(tmp_path / "missing")).message
    np.save(data / "inputs.npy", np.zeros((4, 7, 16), dtype=np.float32))
    error = refusal(files(data))
    assert error.field == "dataset.path" and "inputs.npy" in error.message
    np.save(data / "inputs.npy", np.zeros((64, 7, 16, 16), dtype=np.float32))
    (data / "receivers.json").write_text(json.dumps([{"name": "a", "lat": 45, "lon": 7}]))
    assert "receivers" in refusal(files(data)).message
    (data / "receivers.json").write_text("not json")
    assert "receivers.json" in refusal(files(data)).message
    (data / "positions.npy").write_text("text")
    assert "positions.npy" in refusal(files(data)).message


def test_a_files_dataset_over_the_memory_bound_is_refused(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "rf", SMALL)
    error = refusal(files(data), max_dataset_bytes=1000)
    assert error.field == "dataset.path" and "1000" in error.message


# What a job will cost: its parameters, and a warning where a CPU would take hours.

SEED_EXAMPLE = {"model_architecture": "convnext_large", "epochs": 5, "batch_size": 16}


def test_the_seed_example_is_warned_about_at_submit() -> None:
    """convnext_large on 64x32 maps: 2.8 GFLOP a sample forward, 135 GFLOP a training step
    of 16; at CPU_TRAINING_FLOPS that is about 20 s a step, 510 steps."""
    estimate = preflight(config(**SEED_EXAMPLE))
    assert 190e6 < estimate.parameter_count < 200e6
    [warning] = estimate.warnings
    assert warning.startswith("convnext_large (196 M parameters, 135 GFLOP a training step)")
    assert "on a trainer without a GPU: expect about 19 s a step, 2.7 h for 510 steps" in warning
    on_cpu = preflight(config(**SEED_EXAMPLE, accelerator="cpu")).warnings
    assert len(on_cpu) == 1 and "on the CPU: expect about" in on_cpu[0]


@pytest.mark.parametrize(
    "fields",
    [
        {},  # the default job: minutes on a CPU
        {**SEED_EXAMPLE, "accelerator": "gpu"},  # no CPU will run it
        {**SEED_EXAMPLE, "epochs": 1, "dataset": {"samples": 64}},  # 3 steps
    ],
)
def test_a_job_that_is_quick_enough_is_not_warned_about(fields: dict[str, Any]) -> None:
    estimate = preflight(config(**fields))
    assert estimate.warnings == [] and estimate.parameter_count > 10**6
