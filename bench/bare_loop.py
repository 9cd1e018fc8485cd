"""A bare PyTorch training loop: the same model, data, batch size and seed as a job, and
nothing else (no store, no hooks, no checkpoints but the final weights)."""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.config import JobConfig, SyntheticDataset


@dataclass
class StepClock:
    """Seconds spent per training step, and in getting each batch onto the device."""

    steps: list[float] = field(default_factory=list)
    data: list[float] = field(default_factory=list)


def train_bare(
    config: JobConfig,
    out: Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
    clock: StepClock | None = None,
    ddp: tuple[int, int] | None = None,
) -> float:
    """Train as the job would; returns the wall seconds from data generation to saved weights.

    `ddp` (rank, world size): this process is a rank of an initialised torch.distributed
    group; the model runs under DistributedDataParallel and each step trains this rank's
    equal share of the global batch (as a job's group does)."""
    from services.trainer.dataset import split_indices, synthesise
    from services.trainer.model import build_model, gaussian_nll

    assert isinstance(config.dataset, SyntheticDataset)
    started = time.perf_counter()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = synthesise(config.dataset)
    train_idx, val_idx = split_indices(len(data.positions), config.validation_split, config.seed)
    x_all = torch.from_numpy(data.inputs)
    y_all = torch.from_numpy(data.normalise(data.positions)).float()
    x_train, y_train, x_val, y_val = (
        x_all[train_idx],
        y_all[train_idx],
        x_all[val_idx],
        y_all[val_idx],
    )
    cuda = device.type == "cuda"
    model = build_model(config, x_all.shape[1], (x_all.shape[2], x_all.shape[3])).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model: torch.nn.Module = model
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=cuda or None,
    )
    batch = config.batch_size
    steps = len(x_train) // batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if not cuda:
            return t
        t = t.pin_memory().to(device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t

    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(
            len(x_train), generator=torch.Generator().manual_seed(config.seed + epoch)
        )
        for step in range(steps):
            begun = time.perf_counter()
            idx = order[step * batch : (step + 1) * batch]
            if ddp is not None:
                idx = idx.tensor_split(ddp[1])[ddp[0]]
            x, y = to_device(x_train[idx]), to_device(y_train[idx])
            fetched = time.perf_counter()
            with autocast:
                out_ = step_model(x)
            loss = gaussian_nll(out_, y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            optimizer.step()
            schedule.step()
            loss.item()
            if clock is not None:
                clock.data.append(fetched - begun)
                clock.steps.append(time.perf_counter() - begun)
        model.eval()
        with torch.no_grad(), autocast:
            for start in range(0, len(x_val), 2 * batch):
                sl = slice(start, start + 2 * batch)
                gaussian_nll(model(to_device(x_val[sl])), to_device(y_val[sl])).mean().item()
    if ddp is None or ddp[0] == 0:
        torch.save(model.state_dict(), out / "model.pt")
    return time.perf_counter() - started
