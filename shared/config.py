"""The validated training job config (DESIGN §4), shared by the api and the trainer."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)

_ARCHITECTURE_SOURCE: list[Callable[[], frozenset[str]]] = []


def use_architecture_source(source: Callable[[], frozenset[str]]) -> None:
    """Take the model names from `source` from now on (the api asks its model probes'
    child process, so that its own process never imports timm and torch)."""
    _ARCHITECTURE_SOURCE[:] = [source]


def known_architectures() -> frozenset[str]:
    """Every model name timm can build (`timm.list_models()`), from the source set by
    `use_architecture_source`, else from timm in this process (it pulls in torch)."""
    if _ARCHITECTURE_SOURCE:
        return _ARCHITECTURE_SOURCE[0]()
    return _timm_architectures()


@lru_cache(maxsize=1)
def _timm_architectures() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


# C0 and C1 controls, DEL and lone surrogates: PostgreSQL text and jsonb cannot hold NUL,
# UTF-8 cannot encode a surrogate, and the rest garble terminals, logs and the dashboard.
_UNSENDABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_LINE_BREAKS = frozenset("\t\n\r")


def _sendable(text: str, allowed: frozenset[str] = frozenset()) -> str:
    """`text` if every character can be stored, echoed and sent; ValueError naming the first."""
    for found in _UNSENDABLE.finditer(text):
        if found.group() not in allowed:
            code = f"U+{ord(found.group()):04X}"
            raise ValueError(f"control character or lone surrogate {code} at index {found.start()}")
    return text


SafeStr = Annotated[str, AfterValidator(_sendable)]
"""A string any store, log or client can carry: no control characters, no lone surrogates."""
SafeText = Annotated[str, AfterValidator(partial(_sendable, allowed=_LINE_BREAKS))]
"""A SafeStr that may also span lines: tab, line feed and carriage return are allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class SyntheticDataset(_Strict):
    """Transmitters at random in the receivers' region, seen as path-loss spectrograms."""

    kind: Literal["synthetic"] = "synthetic"
    samples: int = Field(2048, ge=16, le=1_000_000)
    receivers: int = Field(7, ge=1, le=7)
    n_mels: int = Field(64, ge=8, le=512)
    frames: int = Field(32, ge=8, le=1024)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class FilesDataset(_Strict):
    """A dataset written to disk by `heimdall dataset make` (see README)."""

    kind: Literal["files"]
    path: SafeStr = Field(min_length=1)


def _dataset_kind(value: object) -> str:
    """`kind` picks the dataset; a dataset without one is synthetic."""
    if isinstance(value, dict):
        return str(value.get("kind", "synthetic"))
    return str(getattr(value, "kind", "synthetic"))


Dataset = Annotated[
    Annotated[SyntheticDataset, Tag("synthetic")] | Annotated[FilesDataset, Tag("files")],
    Discriminator(_dataset_kind),
]


# Fields a stored config may lack, with the default that lack means.
LATER_FIELDS: dict[str, Any] = {"init_from": None, "nodes": 1}


class JobConfig(_Strict):
    """Everything a trainer needs to run a job; ranges enforced, unknown fields refused."""

    epochs: int = Field(10, ge=1, le=5000)
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=10)
    model_architecture: SafeStr = "convnext_atto"
    pretrained: bool = False
    pretrained_path: SafeStr | None = None
    dropout_rate: float = Field(0.0, ge=0, le=0.9)
    lr_scheduler: Literal["cosine", "step", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(
        1,
        ge=0,
        le=1000,
        description="epochs over which the learning rate ramps up linearly from near 0, at"
        " most half the job; 1 keeps a big model from scratch stable in its first steps"
        " (README: a stable start)",
    )
    early_stop_patience: int = Field(0, ge=0, le=5000, description="0 turns it off")
    max_grad_norm: float | None = Field(1.0, gt=0)
    validation_split: float = Field(0.2, ge=0, le=0.5)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = Field(
        1,
        ge=1,
        le=64,
        description="devices (GPUs, or CPU ranks) on each node; more than 1 trains as one"
        " torchrun group with DistributedDataParallel",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=16,
        description="trainer hosts the group spans (a c10d rendezvous); world size is"
        " devices x nodes",
    )
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    compile: bool = False
    seed: int = Field(42, ge=0, le=2**31 - 1)
    accuracy_radius_m: float = Field(
        20_000.0,
        gt=0,
        description="the radius, metres, within which a prediction counts as accurate; the"
        " default sits at the median error of a kNN on receiver powers on the synthetic data",
    )
    max_attempts: int = Field(3, ge=1, le=20)
    dataset: Dataset = Field(default_factory=SyntheticDataset)
    init_from: SafeStr | None = Field(
        None,
        description="a completed job's id: start from its final weights, with a fresh"
        " optimizer (the same model_architecture and input shape)",
    )

    @field_validator("model_architecture")
    @classmethod
    def _known_to_timm(cls, name: str) -> str:
        if name in known_architectures():
            return name
        close = difflib.get_close_matches(name, sorted(known_architectures()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model '{name}': not in timm.list_models(){hint}")

    @field_validator("init_from")
    @classmethod
    def _a_job_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(UUID(value))
        except ValueError:
            raise ValueError(f"'{value}' is not a job id (a UUID)") from None

    @property
    def world_size(self) -> int:
        """Ranks of the job's torchrun group: `devices` on each of `nodes` hosts."""
        return self.devices * self.nodes

    @model_serializer(mode="wrap")
    def _later_fields_only_when_set(self, dump: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields added after jobs were stored appear in the dump only away from their
        default, so the dump of an older job's config is the one it always had (the stored
        configs, idempotency checks and checkpoints of older jobs compare equal)."""
        fields: dict[str, Any] = dump(self)
        for name, default in LATER_FIELDS.items():
            if fields.get(name, default) == default:
                fields.pop(name, None)
        return fields

    @model_validator(mode="after")
    def _equal_shares(self) -> JobConfig:
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of devices x nodes ="
                f" {self.world_size}: each rank trains an equal share of every batch"
            )
        return self

    @model_validator(mode="after")
    def _pretrained_needs_local_weights(self) -> JobConfig:
        if self.pretrained and not self.pretrained_path:
            raise ValueError("pretrained needs pretrained_path: nothing is downloaded")
        if self.pretrained_path and not Path(self.pretrained_path).is_file():
            raise ValueError(f"pretrained_path '{self.pretrained_path}' is not a file")
        return self
