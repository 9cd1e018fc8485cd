"""Any timm backbone that can take the maps trains: the head is sized from its real output."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.control import NullHooks
from services.trainer.job import run_training
from tests.unit.trainer.configs import tiny_config

# MobileNetV3 and LCNet widen their pooled features past `num_features` with a 1x1 conv.
BACKBONES = ["mobilenetv3_small_050", "lcnet_050", "convnext_atto", "resnet18"]


@pytest.mark.parametrize("architecture", BACKBONES)
def test_each_backbone_trains_one_epoch(architecture: str, tmp_path: Path) -> None:
    config = tiny_config(
        model_architecture=architecture,
        epochs=1,
        dataset={"kind": "synthetic", "samples": 32, "n_mels": 16, "frames": 16, "seed": 3},
    )
    outcome = run_training(config, tmp_path, NullHooks())
    assert outcome.kind == "completed" and outcome.epoch == 1
    assert isinstance(outcome.final_metrics["val_loss"], float)
