"""How batches reach the device: the data resident there when it fits, else prefetched.

On a GPU, `place` moves the splits to the device once when together they take at most
`share` of its free memory; a resident split's batches are gathered there, from index
tensors copied once an epoch. A split left on the host has each batch gathered there,
pinned and copied on a side stream while the step before it runs. On a CPU the batches
are gathered as they always were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from services.trainer.loop import Runtime, Split

# Of the device's free memory: the model, its optimizer and activations need the rest.
RESIDENT_SHARE = 0.25


class Batch(NamedTuple):
    """One batch where the model runs: inputs, normalised targets, true (lat, lon) degrees."""

    inputs: Tensor
    targets: Tensor
    positions: Tensor


def place(
    splits: tuple[Split, ...], runtime: Runtime, share: float = RESIDENT_SHARE
) -> tuple[Split, ...]:
    """The splits moved to the device if they fit `share` of its free memory, else as given."""
    if not runtime.cuda:
        return splits
    free, _ = torch.cuda.mem_get_info(runtime.device)
    if sum(t.nbytes for s in splits for t in (s.inputs, s.targets, s.positions)) > share * free:
        return splits
    return tuple(
        dataclasses.replace(
            s, **{k: getattr(s, k).to(runtime.device) for k in ("inputs", "targets", "positions")}
        )
        for s in splits
    )


def feed(data: Split, batches: Sequence[Tensor], runtime: Runtime) -> Iterator[Batch]:
    """`data`'s batches, given as host index tensors, on the device in order."""
    if not runtime.cuda:
        return (Batch(data.inputs[i], data.targets[i], data.positions[i]) for i in batches)
    if data.inputs.device == runtime.device:
        return _resident(data, batches, runtime)
    return _prefetched(data, batches, runtime)


def _resident(data: Split, batches: Sequence[Tensor], runtime: Runtime) -> Iterator[Batch]:
    if not batches:
        return
    order = runtime.put(torch.cat(list(batches)))  # one copy an epoch, not waited for
    for idx in torch.split(order, [len(b) for b in batches]):
        x, y, pos = (t.index_select(0, idx) for t in (data.inputs, data.targets, data.positions))
        yield Batch(runtime.inputs(x), y, pos)


def _prefetched(data: Split, batches: Sequence[Tensor], runtime: Runtime) -> Iterator[Batch]:
    if not batches:
        return
    side = torch.cuda.Stream(runtime.device)  # type: ignore[no-untyped-call]
    ahead = _copy(data, batches[0], runtime, side)
    for following in [*batches[1:], None]:
        batch, copied = ahead
        if following is not None:  # its copy overlaps this batch's step
            ahead = _copy(data, following, runtime, side)
        main = torch.cuda.current_stream(runtime.device)
        main.wait_event(copied)
        for t in batch:  # made on the side stream, used on the main one
            t.record_stream(main)
        yield batch


def _copy(
    data: Split, idx: Tensor, runtime: Runtime, side: torch.cuda.Stream
) -> tuple[Batch, torch.cuda.Event]:
    """Gather one batch on the host and start its copy on `side`; the event marks its end."""
    x, y, pos = data.inputs[idx], data.targets[idx], data.positions[idx]
    with torch.cuda.stream(side):
        batch = Batch(runtime.inputs(x), runtime.put(y), runtime.put(pos))
        copied = side.record_event()
    return batch, copied
