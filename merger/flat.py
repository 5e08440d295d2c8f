"""FlatWeights: the one in-memory form in which whole models travel between processes.

A model's tensors are packed back to back into one contiguous ``uint8`` numpy buffer plus a table of
(name, dtype, shape, offset). Ray puts numpy buffers in its object store without copying and hands
them to every reader zero-copy, so the learner → engines fan-out after every step and the merger →
everyone broadcast after every iteration cost one copy in and one load out. The collective transport
broadcasts the same buffer in large slices. bfloat16 (which numpy lacks) travels as raw bytes.

Names are Hugging Face checkpoint names (``model.layers.0.mlp.up_proj.weight``); a tied ``lm_head``
is left out, as in ``model.safetensors``. Imports numpy at module level and torch lazily.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ALIGN = 64  # bytes; keeps every tensor's start aligned for vectorised copies


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the prefix: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    offset: int  # byte offset into FlatWeights.buffer
    nbytes: int


@dataclass(frozen=True)
class FlatWeights:
    buffer: np.ndarray  # (N,) uint8, contiguous
    specs: tuple[TensorSpec, ...]
    version: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Zero-copy tensor views over the buffer (read-only when the buffer came from Ray)."""
        import torch

        with warnings.catch_warnings():
            # Buffers from Ray's object store are read-only; every consumer copies out of these views.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            buffer = torch.from_numpy(self.buffer)
        for spec in self.specs:
            raw = buffer[spec.offset : spec.offset + spec.nbytes]
            yield spec.name, raw.view(getattr(torch, spec.dtype)).view(spec.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def flatten(tensors: Iterable[tuple[str, torch.Tensor]], version: int = 0) -> FlatWeights:
    """Pack named tensors (any device, any dtype) into one contiguous CPU buffer."""
    import torch

    items = [(name, t.detach()) for name, t in tensors]
    specs, offset = [], 0
    for name, t in items:
        specs.append(TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, t.nbytes))
        offset = _aligned(offset + t.nbytes)
    buffer = np.empty(offset, dtype=np.uint8)
    target = torch.from_numpy(buffer)
    for spec, (_, t) in zip(specs, items, strict=True):
        target[spec.offset : spec.offset + spec.nbytes].view(t.dtype).view(t.shape).copy_(t)
    return FlatWeights(buffer, tuple(specs), version)


def allocate(entries: Iterable[tuple[str, str, tuple[int, ...], int]], version: int = 0) -> FlatWeights:
    """An uninitialised FlatWeights for (name, dtype, shape, nbytes) entries, laid out as `flatten` lays them out.

    Lets a reader fill the buffer in place (a checkpoint read straight into it, a merge writing its
    result into it) instead of building every tensor first and packing them afterwards.
    """
    specs = layout_specs(entries)
    end = _aligned(specs[-1].offset + specs[-1].nbytes) if specs else 0
    return FlatWeights(np.empty(end, dtype=np.uint8), specs, version)


def layout_specs(entries: Iterable[tuple[str, str, tuple[int, ...], int]]) -> tuple[TensorSpec, ...]:
    """The TensorSpecs `allocate` lays (name, dtype, shape, nbytes) entries out as, without a buffer."""
    specs, offset = [], 0
    for name, dtype, shape, nbytes in entries:
        specs.append(TensorSpec(name, dtype, tuple(shape), offset, nbytes))
        offset = _aligned(offset + nbytes)
    return tuple(specs)
