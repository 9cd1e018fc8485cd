"""Checkpoints (everything a resume needs) and the final model, written atomically.

A checkpoint is a `torch.save` dict, readable with `weights_only=True`:
`format_version`, `config` (JobConfig JSON dump), `model`, `optimizer`, `schedule`,
`scaler` (state dicts), `progress` (epochs completed, steps done in the next epoch, its
running sums, best loss/epoch, epochs without improvement, last metrics, and the best
epoch's weights and metrics, which `model.pt` ships) and `rng`
(python, numpy, torch, cuda). `checkpoints/epoch-0003.pt` is written after epoch 3;
`checkpoints/epoch-0004-step-000042.pt` by a pause 42 steps into epoch 4. The newest
KEEP_CHECKPOINTS and the best epoch's are kept.

`model.pt` holds `format_version`, `kind`, `config`, `state_dict` (a `Localiser`),
`input_shape` [R, M, F], `receivers` [{name, lat, lon}], `normalisation`
{centre, scale} (normalised = (degrees - centre) / scale, in (lat, lon) order), `metrics`
(those of the epoch whose weights it holds: the best by validation loss, else the last).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.optim import Optimizer

from services.trainer.dataset import RFData
from services.trainer.loop import LrSchedule
from services.trainer.model import Localiser, build_model
from shared.config import JobConfig

FORMAT_VERSION = 1
MODEL_KIND = "heimdall-localiser"
KEEP_CHECKPOINTS = 3
Metrics = dict[str, float | int | None]


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used."""


@dataclass
class Progress:
    """Where a job stands: `epoch` epochs done, `step` steps into the next one."""

    epoch: int = 0
    step: int = 0
    tally: dict[str, Any] = field(default_factory=dict)
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    last_metrics: Metrics = field(default_factory=dict)
    # What `model.pt` will hold: the best epoch's weights (on the host) and metrics.
    best_model: dict[str, Any] | None = None
    best_metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class Stateful:
    """The objects whose state a checkpoint carries."""

    model: nn.Module
    optimizer: Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler


def checkpoint_name(progress: Progress) -> str:
    if progress.step == 0:
        return f"epoch-{progress.epoch:04d}.pt"
    return f"epoch-{progress.epoch + 1:04d}-step-{progress.step:06d}.pt"


def save_checkpoint(
    directory: Path, parts: Stateful, progress: Progress, config: JobConfig
) -> tuple[Path, str]:
    """Write a checkpoint atomically; returns its path and sha256."""
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "schedule": parts.schedule.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "progress": asdict(progress),
        "rng": capture_rng(),
    }
    path = directory / checkpoint_name(progress)
    digest = atomic_save(payload, path)
    keep = f"epoch-{progress.best_epoch:04d}.pt" if progress.best_epoch else None
    prune_checkpoints(directory, KEEP_CHECKPOINTS, keep)
    return path, digest


def load_checkpoint(
    path: Path, parts: Stateful, config: JobConfig, sha256: str | None = None
) -> Progress:
    """Restore every part and the RNG states; refuses another format, another config, or,
    given the digest recorded with it (`CheckpointSaved`), a file whose sha256 differs."""
    if sha256 is not None and (found := sha256_of(path)) != sha256:
        raise CheckpointError(
            f"{path}: sha256 {found[:12]}... is not the recorded {sha256[:12]}...:"
            " the file changed after it was written"
        )
    payload = read_payload(path)
    if payload.get("config") != config.model_dump(mode="json"):
        raise CheckpointError(f"{path}: written for a different job config")
    parts.model.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])
    parts.schedule.load_state_dict(payload["schedule"])
    parts.scaler.load_state_dict(payload["scaler"])
    restore_rng(payload["rng"])
    return Progress(**payload["progress"])


def read_payload(path: Path) -> dict[str, Any]:
    """A checkpoint or model file's dict, after checking its format version."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path}: not a Heimdall checkpoint")
    if payload["format_version"] != FORMAT_VERSION:
        found = payload["format_version"]
        raise CheckpointError(
            f"{path}: format version {found}, this trainer reads {FORMAT_VERSION}"
        )
    return payload


def atomic_save(payload: dict[str, Any], path: Path) -> str:
    """torch.save to a temp file beside `path`, fsync, rename over it; returns sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        digest = sha256_of(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def prune_checkpoints(directory: Path, keep: int, protect: str | None) -> None:
    """Delete all but the newest `keep` checkpoints (and `protect`)."""
    files = sorted(directory.glob("epoch-*.pt"))
    for old in files[:-keep]:
        if old.name != protect:
            old.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = cast(
        tuple[str, NDArray[np.uint32], int, int, float], np.random.get_state(legacy=True)
    )
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(
    path: Path, model: nn.Module, config: JobConfig, data: RFData, metrics: Metrics
) -> tuple[Path, str]:
    """Write the trained model with what inference needs to use it."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": MODEL_KIND,
        "config": config.model_dump(mode="json"),
        "state_dict": model.state_dict(),
        "input_shape": list(data.inputs.shape[1:]),
        "receivers": data.sites(),
        "normalisation": {"centre": list(data.centre), "scale": list(data.scale)},
        "metrics": metrics,
    }
    return path, atomic_save(payload, path)


def load_model(path: Path) -> tuple[Localiser, dict[str, Any]]:
    """Rebuild a saved model (in eval mode) and return it with the file's metadata."""
    payload = read_payload(path)
    if payload.get("kind") != MODEL_KIND:
        raise CheckpointError(f"{path}: not a {MODEL_KIND} model file")
    raw = {**payload["config"], "pretrained": False, "pretrained_path": None}
    receivers, n_mels, frames = payload["input_shape"]
    model = build_model(JobConfig.model_validate(raw), receivers, (n_mels, frames))
    model.load_state_dict(payload.pop("state_dict"))
    return model.eval(), payload
