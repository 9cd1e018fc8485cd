"""Learning-rate schedules with linear warmup, set per optimizer step and checkpointable."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer

STEP_DECAY, PLATEAU_DECAY, PLATEAU_PATIENCE, PLATEAU_FLOOR = 0.1, 0.5, 2, 1e-3


class LrSchedule:
    """cosine (to 0), step (x0.1 at each third of training), plateau (x0.5), none.

    Warmup ramps linearly over `warmup_epochs` (at most half the job's steps); plateau
    then halves the rate when the monitored loss has not improved for PLATEAU_PATIENCE
    epochs.
    """

    def __init__(
        self, kind: str, base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int
    ) -> None:
        self.kind, self.base_lr = kind, base_lr
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        # At most half the job warms up, so that every schedule still decays (a 1-epoch job
        # with the default warmup_epochs 1 would otherwise end at its peak rate).
        self.warmup_steps = min(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch // 2)
        self.plateau_factor, self.best, self.bad_epochs = 1.0, math.inf, 0

    def lr_at(self, epoch: int, step: int) -> float:
        """The rate for step `step` (0-based) of epoch `epoch` (1-based)."""
        index = (epoch - 1) * self.steps_per_epoch + step
        if index < self.warmup_steps:
            return self.base_lr * (index + 1) / self.warmup_steps
        return self.base_lr * self._decay(index)

    def _decay(self, index: int) -> float:
        if self.kind == "cosine":
            total = self.epochs * self.steps_per_epoch - self.warmup_steps
            progress = (index - self.warmup_steps) / max(total, 1)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return float(STEP_DECAY ** (index // self.steps_per_epoch // max(self.epochs // 3, 1)))
        if self.kind == "plateau":
            return self.plateau_factor
        return 1.0

    def apply(self, optimizer: Optimizer, epoch: int, step: int) -> float:
        lr = self.lr_at(epoch, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, epoch: int, monitored: float) -> None:
        """Feed the plateau schedule the epoch's monitored loss (after warmup)."""
        if self.kind != "plateau" or epoch * self.steps_per_epoch <= self.warmup_steps:
            return
        if monitored < self.best:
            self.best, self.bad_epochs = monitored, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > PLATEAU_PATIENCE:
            self.plateau_factor = max(self.plateau_factor * PLATEAU_DECAY, PLATEAU_FLOOR)
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_factor": self.plateau_factor, "best": self.best, "bad": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor = float(state["plateau_factor"])
        self.best, self.bad_epochs = float(state["best"]), int(state["bad"])
