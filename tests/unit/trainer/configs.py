"""Tiny job configs: a few seconds of CPU each."""

from __future__ import annotations

from typing import Any

from shared.config import JobConfig


def tiny_config(**overrides: Any) -> JobConfig:
    """convnext_atto on 128 small synthetic samples, 3 epochs of 6 steps, with dropout."""
    fields: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 2e-3,
        "model_architecture": "convnext_atto",
        "dropout_rate": 0.2,
        "warmup_epochs": 1,
        "validation_split": 0.25,
        "accelerator": "cpu",
        "seed": 7,
        "dataset": {"kind": "synthetic", "samples": 128, "n_mels": 16, "frames": 16, "seed": 3},
    }
    fields.update(overrides)
    return JobConfig.model_validate(fields)
