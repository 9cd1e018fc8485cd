"""Model probes without torch in the api's process: a short-lived child builds the models.

The preflight builds the trainer's model for a job's inputs (refusing what cannot train,
counting parameters and FLOPs), and the config checks `model_architecture` against
`timm.list_models()`. Both need timm, which imports torch: about 800 MB resident, held
by the process for good once imported. So the api's own process never imports them. A
child process (spawned, so it shares nothing with the api) answers; it starts on the
first question the api has not seen, and stops after `IDLE_SECONDS` without one. The
api keeps every answer: each depends only on its arguments. A process that has torch
already (the embedded `heimdall up`, which trains too) asks in place.

The functions the child runs (`probe_model`, `architecture_names`, `weights_problem`)
build everything on PyTorch's `meta` device: shapes only, no memory, no arithmetic.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shared.config import JobConfig
from shared.lifetime import exit_with_parent

if TYPE_CHECKING:
    from services.trainer.model import Localiser

IDLE_SECONDS = 30.0
ANY_SIZE_MODELS = "convnext_atto or resnet18"
# Loading real weights into a meta model copies nothing, by design; torch says so per tensor.
META_COPY_WARNING = "for .*: copying from a non-meta parameter"
T = TypeVar("T")
Maps = tuple[int, int, int]  # receivers, n_mels, frames


@dataclass(frozen=True)
class ModelProbe:
    """What building the model and one forward pass found: `problem` (field, message) when
    it cannot train on the inputs, else its trainable `parameters` and the FLOPs of one
    sample's forward pass (`torch.utils.flop_counter`: matrix products and convolutions)."""

    problem: tuple[str, str] | None
    parameters: int = 0
    forward_flops_per_sample: int = 0


class ModelProbes:
    """Asks the torch-side functions below, in a child process unless torch is loaded.

    Thread-safe; blocking (call it from a worker thread in async code). A child that dies
    is replaced once per question.
    """

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy = 0
        self._retire: threading.Timer | None = None
        self._probes: dict[tuple[str, Maps, int], ModelProbe] = {}
        self._pending: dict[tuple[str, Maps, int], Future[ModelProbe]] = {}
        self._names: frozenset[str] | None = None
        self.children_started = 0

    def probe(self, architecture: str, maps: Maps, batch: int) -> ModelProbe:
        """`probe_model`'s answer, kept for good. Callers asking the same question at once
        share one answer: a burst of submits of a new model costs one probe, not one each."""
        key = (architecture, maps, batch)
        with self._lock:
            found = self._probes.get(key)
            if found is not None:
                return found
            pending = self._pending.get(key)
            asking = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not asking:
            return pending.result()
        try:
            found = self._ask(probe_model, architecture, maps, batch)
        except BaseException as error:
            with self._lock:
                self._pending.pop(key, None)
            pending.set_exception(error)
            raise
        with self._lock:
            self._probes[key] = found
            self._pending.pop(key, None)
        pending.set_result(found)
        return found

    def architectures(self) -> frozenset[str]:
        """Every model name timm can build, asked once."""
        if self._names is None:
            self._names = self._ask(architecture_names)
        return self._names

    def weights_problem(self, architecture: str, maps: Maps, path: str) -> str | None:
        """`weights_problem`'s answer (not kept: the file may change)."""
        return self._ask(weights_problem, architecture, maps, path)

    @property
    def child_running(self) -> bool:
        return self._pool is not None

    def close(self) -> None:
        """Stop the child (it is started again when needed)."""
        with self._lock:
            self._stop_child()

    def _ask(self, function: Callable[..., T], *args: Any) -> T:
        if "torch" in sys.modules:  # loaded already: a child would only add a second copy
            return function(*args)
        for attempt in (1, 2):
            with self._lock:
                pool = self._start_child()
                self._busy += 1
            try:
                return pool.submit(function, *args).result()
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                if attempt == 2:
                    raise
            finally:
                with self._lock:
                    self._busy -= 1
                    self._retire_when_idle()
        raise AssertionError("unreachable")

    def _start_child(self) -> ProcessPoolExecutor:
        if self._retire is not None:
            self._retire.cancel()
            self._retire = None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=get_context("spawn"),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            )
            self.children_started += 1
        return self._pool

    def _retire_when_idle(self) -> None:
        if self._busy == 0 and self._pool is not None:
            self._retire = threading.Timer(self.idle_seconds, self.close)
            self._retire.daemon = True
            self._retire.start()

    def _stop_child(self) -> None:
        if self._busy == 0 and self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


PROBES = ModelProbes()


# What the child runs (or the process itself, when torch is loaded).


def architecture_names() -> frozenset[str]:
    """`timm.list_models()`."""
    import timm

    return frozenset(timm.list_models())


def probe_model(architecture: str, maps: Maps, batch: int) -> ModelProbe:
    """Whether `architecture` trains on `[batch, *maps]` inputs (one training-mode forward
    pass; batch norm needs `batch` >= 2), its trainable parameters and its forward FLOPs per
    sample (see `ModelProbe`). 35-160 ms on a CPU once torch is imported."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    receivers, n_mels, frames = maps
    try:
        model = _meta_model(architecture, receivers, (n_mels, frames))
        if batch == 1 and _uses_batch_norm(model):
            problem = f"batch_size 1: {architecture} uses batch norm; use 2 or more"
            return ModelProbe(("batch_size", problem))
        counter = FlopCounterMode(display=False)
        with torch.device("meta"), torch.no_grad(), counter:
            model.train()
            model(torch.zeros(batch, *maps))
    except Exception as error:  # timm models fail in their own ways on shapes they refuse
        return ModelProbe(("model_architecture", _cannot_take(architecture, maps, error)))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelProbe(None, parameters, counter.get_total_flops() // batch)


def weights_problem(architecture: str, maps: Maps, path: str) -> str | None:
    """Why the state_dict at `path` cannot be loaded into the model's backbone, or None."""
    from services.trainer.model import load_backbone_weights

    model = _meta_model(architecture, maps[0], maps[1:])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", META_COPY_WARNING, UserWarning)
            load_backbone_weights(model.backbone, Path(path))
    except ValueError as error:
        return str(error)
    return None


def _meta_model(architecture: str, in_chans: int, size: tuple[int, int]) -> Localiser:
    """The trainer's model, built and probed on the `meta` device (no weights)."""
    import torch

    from services.trainer.model import build_model

    with torch.device("meta"):
        return build_model(JobConfig(model_architecture=architecture), in_chans, size)


def _uses_batch_norm(model: Localiser) -> bool:
    """Batch norm in training needs two values per channel or more; one sample may give one."""
    from torch import nn

    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(module, norms) for module in model.modules())


def _cannot_take(architecture: str, maps: Maps, error: Exception) -> str:
    from timm.models import get_pretrained_cfg

    _, n_mels, frames = maps
    cfg = get_pretrained_cfg(architecture)
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (n_mels, frames):
        height, width = cfg.input_size[1:]
        return (
            f"{architecture} takes only {height}x{width} maps (a fixed input size) and this"
            f" dataset's are {n_mels}x{frames} (n_mels x frames): make them {height}x{width}"
            f" (dataset.n_mels: {height}, dataset.frames: {width}) or choose a model that"
            f" takes any size, such as {ANY_SIZE_MODELS}"
        )
    reason = (str(error).splitlines() or [""])[0] or type(error).__name__
    if reason.startswith(f"model {architecture} "):  # the trainer's probe names model and shape
        return reason
    shape = f"{list(maps)} (receivers, n_mels, frames)"
    return f"{architecture} cannot take inputs of {shape}: {reason}"
