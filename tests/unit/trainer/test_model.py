from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.nn import functional as F

from services.trainer.model import build_model, gaussian_nll, split_output
from tests.unit.trainer.configs import tiny_config


@pytest.mark.parametrize("architecture", ["convnext_atto", "resnet18"])
@pytest.mark.parametrize("size", [(32, 32), (16, 8)])
def test_forward_gives_position_and_log_variance(architecture: str, size: tuple[int, int]) -> None:
    config = tiny_config(model_architecture=architecture)
    model = build_model(config, in_chans=7, input_size=size)
    out = model(torch.randn(3, 7, *size))
    assert out.shape == (3, 4)
    mean, log_var = split_output(out)
    assert mean.shape == log_var.shape == (3, 2)
    torch.autograd.backward(gaussian_nll(out, torch.zeros(3, 2)).mean())
    assert all(p.grad is not None for p in model.head.parameters())


def test_loss_is_gaussian_nll() -> None:
    out, target = torch.randn(5, 4), torch.randn(5, 2)
    mean, log_var = split_output(out)
    expected = F.gaussian_nll_loss(mean, target, log_var.exp(), reduction="mean")
    assert torch.allclose(gaussian_nll(out, target).mean() / 2, expected, atol=1e-6)


def test_local_weights_load_with_the_stem_adapted(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", pretrained=False, in_chans=3)
    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, weights)
    config = tiny_config(
        model_architecture="resnet18", pretrained=True, pretrained_path=str(weights)
    )
    model = build_model(config, in_chans=7, input_size=(16, 16))
    loaded = model.backbone.state_dict()
    assert torch.equal(
        loaded["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"]
    )
    assert loaded["conv1.weight"].shape[1] == 7


def test_weights_for_another_model_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "other.pth"
    torch.save({"unrelated.weight": torch.zeros(2, 2)}, weights)
    config = tiny_config(pretrained=True, pretrained_path=str(weights))
    with pytest.raises(ValueError, match="no weights match"):
        build_model(config, in_chans=7, input_size=(32, 32))
