"""One rank of a torchrun group (DESIGN §6): the collectives the loop needs, and the
process that torchrun's elastic agent starts for each rank (`python -m
services.trainer.group SPEC`).

Every rank trains an equal share of every global batch under DistributedDataParallel
(NCCL on GPUs, gloo on CPUs), validates the whole validation split (the same weights
give every rank the same metrics, so schedules and early stopping agree without a
message), and draws dropout from the same seed. Each node's first rank reports to its
node's trainer (`services.trainer.launcher`), which may ask for a stop. The reporter is
the first rank on the node of the trainer that claimed the job (rank 0 on one host; the
c10d rendezvous numbers the nodes of a multi-host group in its own order): its trainer
writes the events, and it alone writes checkpoints and the final model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from services.trainer.control import Control, NullHooks, TrainingHooks
from shared.config import JobConfig
from shared.lifetime import exit_with_parent
from shared.logs import configure_logging, job_context

log = logging.getLogger("services.trainer.group")  # also when run as __main__

# A control's code in the collective that agrees on it: the highest wins, so a cancel
# beats a preemption, which beats a pause.
CONTROL_CODES = {Control.CONTINUE: 0, Control.PAUSE: 1, Control.PREEMPT: 2, Control.CANCEL: 3}
CONTROLS = {code: control for control, code in CONTROL_CODES.items()}


@dataclass(frozen=True)
class Group:
    """This process's place in the job's torchrun group, from torchrun's environment.

    `control` is a gloo group over the same ranks: the step-boundary flag is agreed on
    the host, so on GPUs it never waits for the device."""

    rank: int
    world_size: int
    local_rank: int
    control: dist.ProcessGroup
    reporter: bool  # the one rank that reports, checkpoints and ships the model

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's equal share of a global batch's sample indices."""
        return batch.tensor_split(self.world_size)[self.rank]

    def agree(self, control: Control) -> Control:
        """Every rank's decision at this step boundary: the highest any rank proposed.
        One all-reduce of one integer on the host (gloo)."""
        flag = torch.tensor([CONTROL_CODES[control]], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return CONTROLS[int(flag.item())]

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed over the ranks, in place on their device (not waited for)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model under DistributedDataParallel (rank 0's weights are broadcast)."""
        on_gpu = next(model.parameters()).device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[self.local_rank] if on_gpu else None)


def join_group(cuda: bool, claimed_here: bool) -> Group:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on GPUs, gloo on CPUs. The reporter is
    local rank 0 of the node whose trainer claimed the job (`claimed_here`)."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    if not isinstance(control, dist.ProcessGroup):
        raise RuntimeError("torch.distributed made no control group for this rank")
    reporter = claimed_here and local_rank == 0
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, control, reporter)


@dataclass(frozen=True)
class RankSpec:
    """What every rank of a group is given, as the JSON file torchrun's command names."""

    job_id: str
    config: dict[str, object]
    workdir: str
    attempt: int
    resume_from: str | None
    resume_sha256: str | None
    init_weights: str | None
    threads: int  # intra-op threads of each CPU rank
    claimed_here: bool  # this node's trainer claimed the job: its first rank reports
    hooks_address: str | None  # where this node's first rank reports to its trainer
    authkey: str  # hex; the launcher's connection accepts no other
    log_format: str = "json"
    log_level: str = "INFO"

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.__dict__))
        path.chmod(0o600)
        return path

    @classmethod
    def read(cls, path: Path) -> RankSpec:
        return cls(**json.loads(path.read_text()))


@record
def main(argv: list[str]) -> None:
    """One rank: join the group, train, and (each node's first rank) report to its
    trainer. An exception ends the process with its message in torchrun's error file,
    which ends the group."""
    from services.trainer.job import run_training
    from services.trainer.launcher import RemoteHooks
    from services.trainer.loop import resolve_runtime

    spec = RankSpec.read(Path(argv[0]))
    configure_logging(spec.log_format, spec.log_level)
    # DDP's note on depthwise kernels `[C, 1, k, k]`: their gradients' stride on the
    # size-1 axis differs from the bucket's, which changes no value and no copy.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    exit_with_parent(os.getppid())  # the launcher's process: never train on without it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the trainer stops us
    config = JobConfig.model_validate(spec.config)
    cuda = resolve_runtime(config.accelerator, config.precision, config.devices).cuda
    if not cuda:
        torch.set_num_threads(spec.threads)
    group = join_group(cuda, spec.claimed_here)
    # Each node's first rank reports to its own trainer (the one that claimed the job
    # records what happens; any may ask for a stop, which every rank then agrees on).
    remote = (
        RemoteHooks(spec.hooks_address, spec.authkey)
        if group.local_rank == 0 and spec.hooks_address
        else None
    )
    hooks: TrainingHooks = remote or NullHooks()
    with job_context(spec.job_id):
        try:
            outcome = run_training(
                config,
                Path(spec.workdir),
                hooks,
                Path(spec.resume_from) if spec.resume_from else None,
                spec.attempt,
                spec.resume_sha256,
                Path(spec.init_weights) if spec.init_weights else None,
                group=group,
            )
            log.info(
                "rank %d of %d: %s after %d epochs and %d steps",
                group.rank,
                group.world_size,
                outcome.kind,
                outcome.epoch,
                outcome.step,
            )
            if remote is not None:
                remote.finish(outcome)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
