"""The first step losses of a job, to judge how stable a recipe starts (not a timed test).

`python -m bench.first_steps --steps 20 [--set key=value ...]` trains the seed example
(convnext_large, 5 epochs, batch 16, the default synthetic dataset) through the trainer's
own `run_training` and cancels after `--steps` steps. It prints one JSON object: the
config's warmup and learning rate, each step's mean training loss (Gaussian NLL, see the
README's metrics glossary), and the seconds per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from services.trainer.control import Checkpoint, Control, Metrics, StartInfo, StepInfo
from services.trainer.job import run_training
from shared.config import JobConfig

SEED_EXAMPLE: dict[str, Any] = {
    "model_architecture": "convnext_large",
    "epochs": 5,
    "batch_size": 16,
    "accelerator": "cpu",
}


class FirstSteps:
    """Hooks that record each step's loss and cancel after `limit` steps."""

    def __init__(self, limit: int) -> None:
        self.limit, self.losses, self.started = limit, list[float](), time.perf_counter()
        self.device = ""

    def on_start(self, info: StartInfo) -> None:
        self.device, self.started = info.device, time.perf_counter()

    def check(self, step: StepInfo) -> Control:
        self.losses.append(round(step.loss, 4))
        return Control.CANCEL if len(self.losses) >= self.limit else Control.CONTINUE

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        return None

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="config key=YAML value")
    args = parser.parse_args()
    fields = dict(SEED_EXAMPLE)
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value)
    config = JobConfig.model_validate(fields)
    hooks = FirstSteps(args.steps)
    with tempfile.TemporaryDirectory() as artifacts:
        run_training(config, Path(artifacts), hooks)
    seconds = (time.perf_counter() - hooks.started) / max(len(hooks.losses), 1)
    report = {
        "config": {k: v for k, v in fields.items()},
        "warmup_epochs": config.warmup_epochs,
        "learning_rate": config.learning_rate,
        "device": hooks.device,
        "losses": hooks.losses,
        "seconds_per_step": round(seconds, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
