"""Refuses at submit a job config that validates but cannot run, before anything is stored.

The trainer keeps its own checks; these run first so that a job which would fail on its
first step is a 422 naming the field, not a `Failed` job minutes later. The model is built
on PyTorch's `meta` device (shapes only, no memory, no arithmetic) by the trainer's own
`build_model`, and its verdict cached per architecture, input shape and batch size.
torch and timm are imported on first use: the api starts without them.

The same probe counts the model's parameters and its FLOPs, from which the submit's
answer warns of a job that will be slow where no GPU runs it (`Estimate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from services.api.probes import PROBES, ModelProbe
from services.trainer.dataset import (
    INPUTS_FILE,
    POSITIONS_FILE,
    RECEIVERS_FILE,
    split_indices,
    steps_per_epoch,
)
from shared.application import TrainingJobs
from shared.config import Dataset, FilesDataset, JobConfig, SyntheticDataset
from shared.domainmodel import InitFromError, TrainingJob

MAX_DATASET_BYTES = 4 * 2**30
FLOAT32_BYTES = 4
FILES_PATH = "dataset.path"
Shape = tuple[int, int, int, int]  # samples, receivers, n_mels, frames
DATASET: TypeAdapter[SyntheticDataset | FilesDataset] = TypeAdapter(Dataset)
# A training step costs about three forward passes (the backward pass about two): Kaplan et
# al. 2020, "Scaling Laws for Neural Language Models", §2.1.
TRAINING_FLOPS_PER_FORWARD = 3
# What a trainer without a GPU sustains, FLOP/s: measured with bench/first_steps.py on a
# 2-core machine (convnext_large, batch 16, 64x32 maps: 135 GFLOP a step in about 20 s).
CPU_TRAINING_FLOPS = 7e9
# A job whose CPU estimate exceeds this many seconds is flagged at submit.
SLOW_JOB_SECONDS = 15 * 60


@dataclass(frozen=True)
class Estimate:
    """What a job will cost, for the submit's answer and the job's row: the model's
    trainable parameters, and warnings in plain words (empty when nothing stands out)."""

    parameter_count: int
    warnings: list[str] = field(default_factory=list)


class PreflightError(ValueError):
    """`field` (dotted, under the config: `dataset.path`) cannot run as given; `message` says
    why and what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def preflight(config: JobConfig, max_dataset_bytes: int = MAX_DATASET_BYTES) -> Estimate:
    """Refuse a config no trainer can run (PreflightError names the first field at fault);
    otherwise what it will cost (`Estimate`).

    Checks, in order: the dataset's inputs (float32
    `[samples, receivers, n_mels, frames]`) fit in `max_dataset_bytes`; a files dataset is
    a readable dataset directory; the model builds for `[batch_size, receivers, n_mels,
    frames]` inputs and one training-mode forward pass goes through (batch norm needs
    `batch_size` >= 2); `pretrained_path` holds weights that fit the model. Reads local
    files but writes nothing. Builds the model only for an architecture, shape and batch
    size not seen before (35-160 ms on a CPU; about a microsecond after, see
    `services.api.probes`); a `pretrained_path` is read on every call. Blocking: call it from a
    worker thread in async code.
    """
    shape = dataset_shape(config.dataset)
    _check_memory(config.dataset, shape, max_dataset_bytes)
    probe = PROBES.probe(config.model_architecture, shape[1:], config.batch_size)
    if probe.problem is not None:
        raise PreflightError(*probe.problem)
    if config.pretrained_path:
        problem = PROBES.weights_problem(
            config.model_architecture, shape[1:], config.pretrained_path
        )
        if problem is not None:
            raise PreflightError("pretrained_path", problem)
    return Estimate(probe.parameters, _cost_warnings(config, shape[0], probe))


def _cost_warnings(config: JobConfig, samples: int, probe: ModelProbe) -> list[str]:
    """A warning when the job, trained on a CPU at `CPU_TRAINING_FLOPS`, would take longer
    than `SLOW_JOB_SECONDS`, unless the config asks for a GPU (then no CPU runs it)."""
    if config.accelerator == "gpu":
        return []
    train, _ = split_indices(samples, config.validation_split, config.seed)
    steps = config.epochs * steps_per_epoch(len(train), config.batch_size)
    step_flops = TRAINING_FLOPS_PER_FORWARD * probe.forward_flops_per_sample * config.batch_size
    step_seconds = step_flops / CPU_TRAINING_FLOPS
    if steps * step_seconds <= SLOW_JOB_SECONDS:
        return []
    where = "on the CPU" if config.accelerator == "cpu" else "on a trainer without a GPU"
    return [
        f"{config.model_architecture} ({_millions(probe.parameters)} parameters,"
        f" {step_flops / 1e9:.0f} GFLOP a training step) {where}: expect about"
        f" {_duration(step_seconds)} a step, {_duration(steps * step_seconds)} for"
        f" {steps} steps"
    ]


def _millions(count: int) -> str:
    return f"{count / 1e6:.0f} M" if count >= 10**7 else f"{count / 1e6:.1f} M"


def _duration(seconds: float) -> str:
    """`0.4 s`, `20 s`, `12 min`, `3.1 h`: one unit, two or three figures."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_init_from(config: JobConfig, jobs: TrainingJobs) -> None:
    """The job `init_from` names can start this one (the rule is the aggregate's
    `check_seeds`): it completed, with the same architecture, on inputs of the same shape.
    InitFromError otherwise. Reads the store and both datasets' headers; blocking."""
    if config.init_from is None:
        return
    parent = jobs.parent_of(config.init_from)
    parent.check_seeds(config.model_architecture)  # status and model first, then the files
    mine, trained = dataset_shape(config.dataset)[1:], _trained_shape(parent)
    parent.check_seeds(config.model_architecture, (mine, trained))


def check_submit(config: JobConfig, jobs: TrainingJobs, max_dataset_bytes: int) -> Estimate:
    """Every check a submit passes before it is stored: `preflight`, then
    `check_init_from`, in one call (one worker-thread hop for an async route). Raises
    what they raise."""
    estimate = preflight(config, max_dataset_bytes)
    check_init_from(config, jobs)
    return estimate


def _trained_shape(parent: TrainingJob) -> tuple[int, int, int]:
    """The input shape `parent` trained on: its dataset's, as its config names it."""
    try:
        dataset = DATASET.validate_python(parent.config.get("dataset", {}))
        shape = dataset_shape(dataset)
    except (ValidationError, PreflightError) as error:
        raise InitFromError(
            f"the inputs job {parent.id} trained on cannot be read any more: {error}"
        ) from error
    return shape[1:]


def dataset_shape(dataset: SyntheticDataset | FilesDataset) -> Shape:
    """`[samples, receivers, n_mels, frames]` of the inputs; a files dataset's from its
    file headers (nothing else is read). PreflightError when the directory is no dataset."""
    if isinstance(dataset, SyntheticDataset):
        return dataset.samples, dataset.receivers, dataset.n_mels, dataset.frames
    folder = Path(dataset.path)
    if not folder.is_dir():
        raise PreflightError(FILES_PATH, f"{folder}: not a directory (see heimdall dataset make)")
    inputs = _array_shape(folder / INPUTS_FILE, ndim=4)
    positions = _array_shape(folder / POSITIONS_FILE, ndim=2)
    receivers = _receiver_count(folder / RECEIVERS_FILE)
    if positions != (inputs[0], 2):
        raise PreflightError(
            FILES_PATH, f"{folder / POSITIONS_FILE}: shape {positions}, want ({inputs[0]}, 2)"
        )
    if inputs[1] != receivers:
        raise PreflightError(
            FILES_PATH,
            f"{folder / INPUTS_FILE}: {inputs[1]} receivers, {RECEIVERS_FILE} lists {receivers}",
        )
    if inputs[0] < 2:
        raise PreflightError(FILES_PATH, f"{folder / INPUTS_FILE}: needs at least 2 samples")
    return inputs[0], inputs[1], inputs[2], inputs[3]


def _array_shape(file: Path, ndim: int) -> tuple[int, ...]:
    """The shape in a .npy header, mapped rather than read; float arrays only."""
    try:
        array: Any = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise PreflightError(FILES_PATH, f"{file}: cannot read a .npy array ({error})") from error
    if not isinstance(array, np.ndarray) or array.ndim != ndim or array.dtype.kind != "f":
        got = f"{array.ndim}-d {array.dtype}" if isinstance(array, np.ndarray) else "no array"
        raise PreflightError(FILES_PATH, f"{file}: want a {ndim}-d float array, got {got}")
    return tuple(int(n) for n in array.shape)


def _receiver_count(file: Path) -> int:
    try:
        sites = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PreflightError(FILES_PATH, f"{file}: cannot read JSON ({error})") from error
    fields = {"name", "lat", "lon"}
    if not isinstance(sites, list) or not all(
        isinstance(s, dict) and fields <= s.keys() for s in sites
    ):
        raise PreflightError(FILES_PATH, f"{file}: want a list of {{name, lat, lon}}")
    return len(sites)


def _check_memory(dataset: SyntheticDataset | FilesDataset, shape: Shape, limit: int) -> None:
    samples, receivers, n_mels, frames = shape
    need = samples * receivers * n_mels * frames * FLOAT32_BYTES
    if need <= limit:
        return
    field = "dataset" if isinstance(dataset, SyntheticDataset) else FILES_PATH
    raise PreflightError(
        field,
        f"the inputs take {need} bytes ({samples} samples x {receivers} receivers x"
        f" {n_mels} x {frames} float32), over the {limit} bytes a trainer holds:"
        " use fewer samples or smaller maps",
    )
