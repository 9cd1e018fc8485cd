"""Runs one training job: data, model, epochs, checkpoints, pause and cancel, outcome."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from services.trainer.baselines import baseline_fields
from services.trainer.checkpoints import (
    MODEL_KIND,
    CheckpointError,
    Progress,
    Stateful,
    load_checkpoint,
    read_payload,
    save_checkpoint,
    save_model,
)
from services.trainer.control import (
    Checkpoint,
    Control,
    Metrics,
    Outcome,
    StartInfo,
    StepInfo,
    TrainingHooks,
)
from services.trainer.dataset import (
    RFData,
    load_dataset,
    split_indices,
    steps_per_epoch,
    synthesise,
)
from services.trainer.export import export_at_completion
from services.trainer.loop import (
    EpochPlan,
    Geo,
    LrSchedule,
    Runtime,
    Split,
    StepParts,
    Tally,
    epoch_batches,
    epoch_train_metrics,
    place,
    resolve_runtime,
    train_one_epoch,
    validate,
)
from services.trainer.model import build_model
from shared.config import JobConfig, SyntheticDataset
from shared.readmodel.shapes import EpochMetrics

if TYPE_CHECKING:
    from services.trainer.group import Group

CHECKPOINT_DIR, MODEL_FILE = "checkpoints", "model.pt"
# Controls that stop the run with a checkpoint to resume from, and the outcome they give.
STOPS: dict[Control, Literal["paused", "preempted"]] = {
    Control.PAUSE: "paused",
    Control.PREEMPT: "preempted",
}
METRIC_KEYS = tuple(EpochMetrics.model_fields)


@dataclass
class _Job:
    config: JobConfig
    workdir: Path
    data: RFData
    train: Split
    val: Split
    step: StepParts
    parts: Stateful
    progress: Progress
    checkpoint: str | None
    mark: float  # perf_counter at the attempt's start, then at the end of each epoch's record
    checkpoint_dir: Path  # this attempt's own
    baselines: dict[str, float]  # recorded with every epoch's metrics
    group: Group | None = None  # a rank of a torchrun group

    @property
    def writes(self) -> bool:
        """This process writes checkpoints and the model: alone, or the group's reporter."""
        return self.group is None or self.group.reporter

    @property
    def steps(self) -> int:
        return self.parts.schedule.steps_per_epoch


def run_training(
    config: JobConfig,
    workdir: Path,
    hooks: TrainingHooks,
    resume_from: Path | None = None,
    attempt: int = 1,
    resume_sha256: str | None = None,
    init_weights: Path | None = None,
    group: Group | None = None,
) -> Outcome:
    """Train `config`, writing `workdir`/checkpoints/attempt-N/ and `workdir`/model.pt.

    Each attempt checkpoints into a folder of its own, so a stale attempt can never
    overwrite or prune the next one's files. A resume checks the file against
    `resume_sha256` when given. A job with `init_from` starts from `init_weights`, the
    `model.pt` of that job, unless it resumes its own checkpoint. Pause, preemption and
    cancel from `hooks.check` act at the next step boundary; exceptions propagate.

    In a torchrun group (`group`, world size devices x nodes) every rank calls this: each
    trains its share of every batch under DDP, the ranks agree on every stop, and only
    the reporter writes files (`services.trainer.group`). Without one, a config with a
    world size above 1 raises ValueError: it needs the group launcher.
    """
    if config.world_size > 1 and group is None:
        raise ValueError(
            f"devices x nodes = {config.world_size} runs as a torchrun group: submit the job"
            " to a trainer (heimdall up) rather than train it in this process"
        )
    if config.init_from and resume_from is None and init_weights is None:
        raise ValueError(f"init_from {config.init_from}: that job's model.pt was not given")
    runtime = resolve_runtime(config.accelerator, config.precision)
    with _reproducible(runtime):
        start = init_weights if config.init_from and resume_from is None else None
        job = _prepare(config, workdir, runtime, resume_from, resume_sha256, start, group)
        job.checkpoint_dir = workdir / CHECKPOINT_DIR / f"attempt-{attempt}"
        hooks.on_start(_start_info(job, runtime))
        return _run(job, hooks)


@contextmanager
def _reproducible(runtime: Runtime) -> Iterator[None]:
    """Deterministic kernels on CPU (so a resume equals a straight run), fast ones on CUDA."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, matmul = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    if runtime.cuda:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    else:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.set_float32_matmul_precision(matmul)


def _prepare(
    config: JobConfig,
    workdir: Path,
    runtime: Runtime,
    resume_from: Path | None,
    resume_sha256: str | None = None,
    init_weights: Path | None = None,
    group: Group | None = None,
) -> _Job:
    started = time.perf_counter()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset)
    train, val = place(_splits(data, config), runtime)  # resident on a GPU when they fit
    model = build_model(config, data.inputs.shape[1], data.inputs.shape[2:])
    if init_weights is not None:
        _start_from(model, init_weights, config, tuple(data.inputs.shape[1:]))
    model = model.to(runtime.device)
    if runtime.cuda:
        model = model.to(memory_format=torch.channels_last)
    parts = _stateful(model, config, runtime, steps_per_epoch(len(train), config.batch_size))
    progress = (
        load_checkpoint(resume_from, parts, config, resume_sha256) if resume_from else Progress()
    )
    step_model = group.wrap(model) if group else model
    if config.compile:
        step_model = cast(nn.Module, torch.compile(step_model))
    geo = Geo(data.centre, data.scale)
    step = StepParts(
        step_model, parts.optimizer, parts.scaler, parts.schedule, runtime, geo,
        config.max_grad_norm, config.accuracy_radius_m, group,
    )  # fmt: skip
    checkpoint = str(resume_from.resolve()) if resume_from else None
    checkpoints = workdir / CHECKPOINT_DIR
    return _Job(
        config, workdir, data, train, val, step, parts, progress, checkpoint, started,
        checkpoints, _baselines(data, config), group,
    )  # fmt: skip


def _start_from(model: nn.Module, path: Path, config: JobConfig, shape: tuple[int, ...]) -> None:
    """`init_from`: that job's final weights into `model` (the optimizer stays fresh).
    Read as saved, with no model built for them, so the RNG streams match a fresh start's.
    CheckpointError naming the job when the file is missing, unreadable or of another
    architecture or input shape than this job's."""
    try:
        payload = read_payload(path)
        found = (payload.get("kind"), payload["config"]["model_architecture"])
        trained = tuple(payload["input_shape"])
        if (found, trained) != ((MODEL_KIND, config.model_architecture), shape):
            raise CheckpointError(
                f"{path}: a {found[1]} for inputs {list(trained)}, this job trains a"
                f" {config.model_architecture} on {list(shape)}"
            )
        model.load_state_dict(payload["state_dict"])
    except (CheckpointError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(
            f"init_from {config.init_from}: cannot start from that job's final weights: {error}"
        ) from error


def _baselines(data: RFData, config: JobConfig) -> dict[str, float]:
    train_idx, val_idx = split_indices(len(data.positions), config.validation_split, config.seed)
    return baseline_fields(data, train_idx, val_idx)


def _splits(data: RFData, config: JobConfig) -> tuple[Split, Split]:
    train_idx, val_idx = split_indices(len(data.positions), config.validation_split, config.seed)
    inputs = torch.from_numpy(data.inputs)
    targets = torch.from_numpy(data.normalise(data.positions)).float()
    positions = torch.from_numpy(data.positions)

    def side(idx: NDArray[np.int64]) -> Split:
        rows = torch.from_numpy(idx)
        return Split(inputs[rows], targets[rows], positions[rows])

    return side(train_idx), side(val_idx)


def _stateful(model: nn.Module, config: JobConfig, runtime: Runtime, steps: int) -> Stateful:
    """AdamW without weight decay on norms and biases; a scaler only for CUDA fp16."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, fused=runtime.cuda or None)
    schedule = LrSchedule(
        config.lr_scheduler, config.learning_rate, config.epochs, steps, config.warmup_epochs
    )
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.cuda and config.precision == "fp16")
    return Stateful(model, optimizer, schedule, scaler)


def _start_info(job: _Job, runtime: Runtime) -> StartInfo:
    sizes = len(job.train), len(job.val)
    device = runtime.describe(job.config.world_size)
    return StartInfo(device, *sizes, job.progress.epoch, job.config.epochs, job.steps)


def _run(job: _Job, hooks: TrainingHooks) -> Outcome:
    p, patience = job.progress, job.config.early_stop_patience
    while p.epoch < job.config.epochs and not (patience and p.bad_epochs >= patience):
        control = _train_epoch(job, hooks)
        if control is Control.CANCEL:
            return _outcome(job, "cancelled")
        stopping = STOPS.get(control)
        if stopping and p.step < job.steps:
            _checkpoint(job, hooks)
            return _outcome(job, stopping)
        _finish_epoch(job, hooks)
        if stopping:
            return _outcome(job, stopping)
    if not job.writes:
        return _outcome(job, "completed")
    model, metrics = _shipped(job), p.best_metrics or p.last_metrics
    path, _ = save_model(job.workdir / MODEL_FILE, model, job.config, job.data, metrics)
    export_at_completion(path, job.data, job.config)  # before `Completed`; never raises
    return _outcome(job, "completed", str(path.resolve()))


def _train_epoch(job: _Job, hooks: TrainingHooks) -> Control:
    p, cfg = job.progress, job.config
    epoch, steps = p.epoch + 1, job.steps
    batches = epoch_batches(len(job.train), cfg.batch_size, cfg.seed, epoch)
    if job.group is not None:
        batches = [job.group.shard(batch) for batch in batches]
    plan = EpochPlan(epoch, batches, p.step)
    tally = Tally(**p.tally) if p.step else Tally()
    control = Control.CONTINUE

    def stop(step: int, loss: Callable[[], float], speed: float) -> bool:
        nonlocal control
        control = hooks.check(StepInfo(epoch, step, steps, loss, speed))
        if job.group is not None:
            control = job.group.agree(control)
        return control is not Control.CONTINUE

    train_one_epoch(job.step, _epoch_train(job, epoch), plan, tally, stop)
    p.step, p.tally = tally.steps, tally.as_dict()
    return control


def _epoch_train(job: _Job, epoch: int) -> Split:
    """Epoch `epoch`'s training samples. Synthetic data is free, so each epoch draws as many
    fresh ones (from the dataset's seed and the epoch: a resume draws them again), which
    keeps the model from learning each sample's shadowing; a files dataset's are fixed."""
    cfg = job.config.dataset
    if not isinstance(cfg, SyntheticDataset):
        return job.train
    fresh = synthesise(cfg, draw=epoch, samples=len(job.train))
    targets = torch.from_numpy(job.data.normalise(fresh.positions)).float()
    return Split(torch.from_numpy(fresh.inputs), targets, torch.from_numpy(fresh.positions))


def _finish_epoch(job: _Job, hooks: TrainingHooks) -> None:
    """Validate, record the epoch's metrics and best, feed the schedule, checkpoint."""
    p = job.progress
    metrics = _epoch_metrics(job, Tally(**p.tally))
    monitored = float(cast(float, metrics["val_loss"] if job.val else metrics["train_loss"]))
    improved = p.best_loss is None or monitored < p.best_loss
    if improved:
        p.best_loss, p.bad_epochs = monitored, 0
    else:
        p.bad_epochs += 1
    is_best = improved or not job.val  # without validation data the last epoch ships
    if is_best:
        p.best_epoch, p.best_metrics = p.epoch + 1, metrics
        p.best_model = _host_copy(job.parts.model) if job.val else None
    job.parts.schedule.end_epoch(p.epoch + 1, monitored)
    p.epoch, p.step, p.tally, p.last_metrics = p.epoch + 1, 0, {}, metrics
    hooks.on_epoch(dict(metrics), is_best, _save_checkpoint(job))  # the file first
    job.mark = time.perf_counter()


def _host_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _shipped(job: _Job) -> nn.Module:
    """The model `model.pt` holds: the best epoch's weights (the last without validation)."""
    if job.progress.best_model is not None:
        job.parts.model.load_state_dict(job.progress.best_model)
    return job.parts.model


def _epoch_metrics(job: _Job, tally: Tally) -> Metrics:
    """Exactly METRIC_KEYS, the validation ones None without validation data.

    Throughput counts training steps only; `epoch_duration_seconds` runs from `job.mark`.
    """
    cfg, t, epoch = job.config, job.step, job.progress.epoch + 1
    started = time.perf_counter()
    model = job.parts.model if job.group else t.model  # every rank validates it all, alone
    val = validate(
        model, job.val, t.runtime, t.geo, 2 * cfg.batch_size, cfg.accuracy_radius_m, epoch
    )
    metrics: Metrics = {"epoch": epoch, **epoch_train_metrics(tally), **val, **job.baselines}
    ready = time.perf_counter()
    metrics["epoch_seconds"] = tally.seconds + ready - started
    metrics["epoch_duration_seconds"] = ready - job.mark
    metrics["samples_per_second"] = tally.samples / max(tally.seconds, 1e-9)
    if unknown := metrics.keys() - set(METRIC_KEYS):
        raise KeyError(f"metrics {sorted(unknown)} are not fields of EpochMetrics")
    return {key: metrics.get(key) for key in METRIC_KEYS}


def _save_checkpoint(job: _Job) -> Checkpoint:
    """Write this attempt's checkpoint of where the job stands (atomically); in a group,
    the reporter alone writes, and the others name none."""
    if not job.writes:
        return Checkpoint(job.progress.epoch, "", "")
    path, digest = save_checkpoint(job.checkpoint_dir, job.parts, job.progress, job.config)
    job.checkpoint = str(path.resolve())
    return Checkpoint(job.progress.epoch, job.checkpoint, digest)


def _checkpoint(job: _Job, hooks: TrainingHooks) -> None:
    """A mid-epoch checkpoint (before a pause or preemption), recorded on its own."""
    saved = _save_checkpoint(job)
    hooks.on_checkpoint(saved.epoch, saved.uri, saved.sha256)


def _outcome(
    job: _Job,
    kind: Literal["completed", "paused", "preempted", "cancelled"],
    model_uri: str | None = None,
) -> Outcome:
    p = job.progress
    best_val = p.best_loss if len(job.val) else None
    metrics = dict(p.last_metrics)
    return Outcome(
        kind, p.epoch, job.checkpoint, metrics, p.best_epoch, best_val, model_uri, p.step
    )
