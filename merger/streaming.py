"""Streaming merge: SLERP or LERP of M policies, then optionally LITI, one tensor of each input at a time.

Owns ``merge_checkpoints`` (HF directories in, HF directory out: what ``warp-rlhf merge`` runs) and
the per-tensor loop it shares with the merger service, ``merge_stream``, whose inputs are anything
with a ``layout`` and a ``tensor(name)``: a Checkpoint, or FlatWeights seen through ``FlatSource``.
Per-tensor granularity is one pass over the inputs; global granularity is two (the Gram matrix of the
whole model first, then the weighted sums), still one tensor of each input at a time.

Imports torch (through merger.weights); never ray, vllm or deepspeed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from tqdm import tqdm

from merger.checkpoint import Checkpoint, CheckpointWriter, Layout, check_compatible, check_output, tensor_nbytes
from merger.errors import CheckpointError
from merger.flat import FlatWeights
from merger.weights import GRANULARITIES, add_task_vectors, lerp_coefficients, slerp_coefficients, tensor_gram

METHODS = ("slerp", "lerp")
T = TypeVar("T")


class Source(Protocol):
    """A model readable one tensor at a time; ``buffer`` is scratch memory the reader may read into."""

    @property
    def layout(self) -> Layout: ...

    def tensor(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor: ...


class FlatSource:
    """FlatWeights as a merge input: zero-copy views over its buffer (no scratch memory needed)."""

    def __init__(self, flat: FlatWeights) -> None:
        self.layout: Layout = {s.name: (s.dtype, s.shape) for s in flat.specs}
        self._tensors = dict(flat.tensors())

    def tensor(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name]


def check_request(method: str, policies: int, lam: float | None, eta: float | None, granularity: str) -> None:
    """Refuse a malformed merge request up front, before any input is read or output created."""
    if method not in METHODS:
        raise CheckpointError(f"method {method!r}: must be one of {', '.join(METHODS)}")
    if policies < 1:
        raise CheckpointError("need at least one policy to merge")
    if granularity not in GRANULARITIES:
        raise CheckpointError(f"granularity {granularity!r}: must be one of {', '.join(GRANULARITIES)}")
    if lam is not None:
        if method != "slerp" or policies != 2:
            raise CheckpointError(f"lam = {lam}: only for SLERP of two policies (M > 2 uses λ = 1/k at step k)")
        if not 0.0 <= lam <= 1.0:
            raise CheckpointError(f"lam = {lam}: must be in [0, 1]")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise CheckpointError(f"eta = {eta}: must be in [0, 1]")


def merged_layout(init: Source, policies: Sequence[Source]) -> Layout:
    """The merge's layout: θ_init's, each tensor as wide as its widest input (fp32 policies over a bf16 θ_init: fp32).

    The policies are the learners' fp32 master weights, and the merge is their next value: θ_init of the
    next iteration, from which every run restarts. Stored in a bf16 θ_init's dtype it was rounded as a bf16
    master weight would be, and at RL's learning rates most of each iteration's update is below bf16's
    resolution: in the bf16 CPU demo, iteration 1's θ_init kept 20% of its LITI update (its projection on
    the exact one) and 8.4% of its elements moved at all; θ_slerp kept 55%. Engines round to their dtype
    as they load it.
    """

    def width(dtype: str) -> int:
        return getattr(torch, dtype).itemsize

    layout = {}
    for name, (dtype, shape) in init.layout.items():
        widest = max((p.layout[name][0] for p in policies), key=width, default=dtype)
        layout[name] = (widest if width(widest) > width(dtype) else dtype, shape)
    return layout


def merge_stream(
    init: Source,
    policies: Sequence[Source],
    method: str = "slerp",
    lam: float | None = None,
    eta: float | None = None,
    granularity: str = "tensor",
    keep_merged: bool = False,
    into: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
    """Yield (name, θ_merge or None, θ_out) per tensor in θ_init's order, reading one tensor of each input at a time.

    θ_out is the LITI result θ_init + η Σ c_m δ_m with ``eta``, else θ_merge = θ_init + Σ c_m δ_m;
    θ_merge itself comes only with ``keep_merged``. θ_out goes into ``into[name]`` if given, in its dtype
    (θ_merge too), else both are in ``merged_layout``'s dtype. The
    caller has checked that every source has θ_init's layout. Yielded tensors live in reused
    buffers: they are valid until the next one is requested.
    """
    check_request(method, len(policies), lam, eta, granularity)
    sources = [init, *policies]
    # Policies may be stored wider than θ_init (fp32 master weights over a bf16 θ_init): size for the widest.
    largest = max((tensor_nbytes(d, s) for src in sources for d, s in src.layout.values()), default=0)
    # Scratch reused for every tensor: fresh allocations this size page-fault on each tensor. Two
    # read sets, so the next tensor is read while this one is merged; these are the few tensors of
    # each input held at a time.
    reads = [[torch.empty(largest, dtype=torch.uint8) for _ in sources] for _ in range(2)]
    outputs = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]

    def read(name: str, i: int, with_gram: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """On the read-ahead thread: one tensor of every input and, for per-tensor SLERP, their Gram matrix.

        Computing the Gram matrix here pipelines SLERP's two passes over a tensor on two cores.
        """
        tensors = [source.tensor(name, buffer) for source, buffer in zip(sources, reads[i % 2], strict=True)]
        return tensors, (tensor_gram(tensors[0], tensors[1:]) if with_gram else None)

    names, layout = list(init.layout), merged_layout(init, policies)
    shared = None  # coefficients of every tensor, where they do not depend on the tensor
    if method == "lerp":
        shared = lerp_coefficients(len(policies))
    elif len(policies) == 1:
        shared = [1.0]  # the policy itself, bit for bit
    elif granularity == "global":
        grams = (g for _, (_, g) in _prefetched(partial(read, with_gram=True), names))
        shared = slerp_coefficients(sum(grams, torch.zeros(len(policies), len(policies), dtype=torch.float64)), lam)
    for name, ((t, *ps), g) in _prefetched(partial(read, with_gram=shared is None), names):
        coeffs = shared if shared is not None else slerp_coefficients(g, lam)
        scale = 1.0 if eta is None else eta  # LITI: θ_init + η (θ_merge − θ_init), one rounding
        target = into[name] if into is not None else _typed(outputs[0], *layout[name])
        out = add_task_vectors(t, ps, [scale * c for c in coeffs], out=target)
        merged = None
        if keep_merged:
            merged = out if eta is None else add_task_vectors(t, ps, coeffs, out=_like(outputs[1], out))
        yield name, merged, out


def _prefetched(read: Callable[[str, int], T], names: list[str]) -> Iterator[tuple[str, T]]:
    """(name, read(name, i)) in order, reading item i + 1 on a thread while the caller works on item i.

    File reads release the GIL, so input I/O overlaps the merge maths. ``read`` must put item i in
    buffer set i % 2: item i + 2 is only started once the caller has asked for item i + 1.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read") as pool:
        ahead = pool.submit(read, names[0], 0) if names else None
        for i, name in enumerate(names):
            item = ahead.result()
            if i + 1 < len(names):
                ahead = pool.submit(read, names[i + 1], i + 1)
            yield name, item


def _like(buffer: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return buffer[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)


def _typed(buffer: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    return buffer[: tensor_nbytes(dtype, shape)].view(getattr(torch, dtype)).view(shape)


def merge_checkpoints(
    init_dir: str | Path,
    policy_dirs: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "slerp",
    lam: float | None = None,
    eta: float | None = None,
    *,
    granularity: str = "tensor",
    merged_dir: str | Path | None = None,
    shard_size_mb: int = 2048,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Merge HF checkpoints into ``out_dir``, streaming; config and tokenizer come from ``init_dir``.

    ``out_dir`` receives θ_merge = SLERP (λ = ``lam``, default 1/2; 1/k for M > 2) or LERP (uniform)
    of the policies' task vectors, or with ``eta`` the LITI result (1 − η) θ_init + η θ_merge; then
    ``merged_dir``, if given, also receives θ_merge. Every check (inputs, architectures, outputs)
    runs before the first byte is written, and an output appears only when complete. ``progress``
    shows a bar of bytes merged (the command line's).
    """
    check_request(method, len(policy_dirs), lam, eta, granularity)
    outputs = [Path(out_dir)] + ([Path(merged_dir)] if merged_dir is not None else [])
    with ExitStack() as stack, single_threaded():
        init = stack.enter_context(Checkpoint(init_dir))
        policies = [stack.enter_context(Checkpoint(d)) for d in policy_dirs]
        check_compatible(init, policies)
        _check_outputs(outputs, [init.path, *(p.path for p in policies)], overwrite)
        layout = merged_layout(init, policies)
        writers = [
            stack.enter_context(CheckpointWriter(out, layout, init.path, shard_size_mb, overwrite)) for out in outputs
        ]
        stream = merge_stream(init, policies, method, lam, eta, granularity, keep_merged=merged_dir is not None)
        bar = stack.enter_context(
            tqdm(total=init.nbytes, unit="B", unit_scale=True, desc=f"merge ({method})", disable=not progress)
        )
        for name, merged, out in stream:
            writers[0].write(name, out)
            if merged_dir is not None:
                writers[1].write(name, merged)
            bar.update(init.entries[name].nbytes)
    return outputs[0]


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's maths on one thread for the block, restoring the thread count after.

    The merge is memory-bound and works in cache-sized blocks; the second core serves the read-ahead
    thread. OpenMP's fork/join on every block op stalls whenever cores are shared (measured on the
    2-core CI machine under load: 60 s instead of 1 s for SmolLM2-135M).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_outputs(outputs: list[Path], inputs: list[Path], overwrite: bool) -> None:
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in resolved:
            raise CheckpointError(f"output {out}: is also an input; choose another directory")
        check_output(out, overwrite)
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise CheckpointError(f"output {outputs[0]}: given twice")
