"""A timm backbone with a head predicting the transmitter position and its uncertainty."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn
from torch.nn import functional as F

from shared.config import JobConfig

LOG_VAR_RANGE = (-12.0, 6.0)
CALIBRATION_SHARE = 0.68
# chi-square (2 dof) quantile of CALIBRATION_SHARE: its CDF is 1 - exp(-x / 2).
CHI2_2DOF_68 = -2 * math.log(1 - CALIBRATION_SHARE)


class Localiser(nn.Module):
    """Maps `[B, receivers, M, F]` to `[B, 4]`: normalised (lat, lon) and their log-variances."""

    def __init__(self, backbone: nn.Module, features: int, min_side: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, 4)
        self.min_side = min_side
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h < self.min_side or w < self.min_side:
            size = (max(h, self.min_side), max(w, self.min_side))
            x = F.interpolate(x, size=size, mode="nearest")
        out: Tensor = self.head(self.backbone(x))
        return out


def split_output(out: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (clamped) log-variance, in fp32 whatever the autocast dtype."""
    out = out.float()
    return out[:, :2], out[:, 2:].clamp(*LOG_VAR_RANGE)


def gaussian_nll(out: Tensor, target: Tensor) -> Tensor:
    """Per-sample Gaussian NLL (constant dropped) of normalised positions, shape `[B]`."""
    mean, log_var = split_output(out)
    return (0.5 * (log_var + (target - mean) ** 2 * torch.exp(-log_var))).sum(dim=1)


def inside_68(out: Tensor, target: Tensor) -> Tensor:
    """Whether each normalised target `[B, 2]` lies in the predicted 68 % region, `[B]` bool.

    For the diagonal 2-D Gaussian the squared Mahalanobis distance
    sum((target - mean)^2 / var) follows chi-square with 2 dof, so the region is
    where it is <= -2 ln(0.32), about 2.279.
    """
    return mahalanobis_sq(out, target) <= CHI2_2DOF_68


def mahalanobis_sq(out: Tensor, target: Tensor) -> Tensor:
    """Squared Mahalanobis distance `[B]` of normalised targets `[B, 2]` from the predicted
    diagonal Gaussian: <= 1 inside the 1-sigma ellipse (39.3 % of truths when calibrated)."""
    mean, log_var = split_output(out)
    return ((target - mean) ** 2 * torch.exp(-log_var)).sum(dim=1)


def build_model(config: JobConfig, in_chans: int, input_size: tuple[int, int]) -> Localiser:
    """The job's backbone (no download) plus a head as wide as what the backbone puts out for
    an input of the real size (ValueError naming the model when it cannot take that size)."""
    backbone = timm.create_model(
        config.model_architecture,
        pretrained=False,
        in_chans=in_chans,
        num_classes=0,
        drop_rate=config.dropout_rate,
    )
    if config.pretrained_path:
        load_backbone_weights(backbone, Path(config.pretrained_path))
    min_side = _total_stride(backbone)
    features = _output_width(backbone, config.model_architecture, in_chans, input_size, min_side)
    return Localiser(backbone, features, min_side)


def _output_width(
    backbone: nn.Module, name: str, in_chans: int, size: tuple[int, int], min_side: int
) -> int:
    """How many features the backbone really puts out for one `[in_chans, *size]` input.

    `num_features` is the width before timm's pooling head, which some families
    (MobileNetV3, LCNet) widen further with a 1x1 conv; a dry run sees what comes out.
    """
    side = (max(size[0], min_side), max(size[1], min_side))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_chans, *side))
    except RuntimeError as error:
        shape = [in_chans, *size]
        raise ValueError(f"model {name} cannot take inputs of shape {shape}: {error}") from error
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"model {name} gives outputs of shape {list(out.shape)}, want [1, C]")
    return int(out.shape[1])


def _total_stride(backbone: nn.Module) -> int:
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict):
        return int(info[-1].get("reduction", 1))
    return 1


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local timm/torchvision-style checkpoint, adapting the stem to `in_chans`.

    The file is what `torch.save(model.state_dict(), path)` writes (the state_dict may sit
    under `state_dict`, `model` or `state_dict_ema`). ValueError naming the path when it
    cannot be read, is no such checkpoint, or none of its weights fit this model.
    """
    try:
        state = _read_state_dict(path)
    except Exception as error:  # torch.load fails on other files in many ways: KeyError: 101
        cause = error.__cause__ or error
        why = (
            f"cannot read it ({cause.strerror})"
            if isinstance(cause, OSError)
            else "not a PyTorch checkpoint: want what torch.save(model.state_dict(), path) writes"
        )
        raise ValueError(f"pretrained_path {path}: {why}") from error
    own = backbone.state_dict()
    fitted = {}
    for key, value in state.items():
        weight = _fit(value, own[key]) if key in own else None
        if weight is not None:
            fitted[key] = weight
    if not fitted:
        raise ValueError(f"pretrained_path {path}: no weights match this model")
    backbone.load_state_dict(fitted, strict=False)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"pretrained_path {path}: cannot read weights ({error})") from error
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict):
        raise ValueError(f"pretrained_path {path}: not a state_dict")
    return {str(k).removeprefix("module."): v for k, v in raw.items() if isinstance(v, Tensor)}


def _fit(value: Tensor, want: Tensor) -> Tensor | None:
    """The weight as this model needs it: a stem conv gets adapted to the input channels."""
    if value.shape == want.shape:
        return value
    if value.ndim == 4 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
        adapted: Tensor = adapt_input_conv(want.shape[1], value)
        return adapted
    return None
