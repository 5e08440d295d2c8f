"""The merger service: the end of every WARP iteration (merge the M runs, LITI, save, hand back θ_init).

Owns ``Merger``, a plain class that works in-process, and ``MergerService``, the same class as a Ray
actor with resources from config (``ray.remote(...)(Merger)``, built here, never a decorator). Inputs
are FlatWeights, Ray object references to FlatWeights, or HF directories, in any mix; the merge
streams one tensor at a time and writes ``<output>/iter-<i>/slerp`` and ``iter-<i>/init`` per the output
contract. In-process it can also return the new θ_init as FlatWeights; the service (a run's merger) keeps
nothing whole, and the run reads θ_init from ``iter-<i>/init``.

Imports torch (through merger.streaming) and ray lazily, only in MergerService or when an input is an
object reference; never vllm or deepspeed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from merger.checkpoint import Checkpoint, CheckpointWriter, check_same_layout, tensor_nbytes
from merger.errors import CheckpointError
from merger.flat import FlatWeights, allocate
from merger.streaming import FlatSource, Source, merge_stream, merged_layout, single_threaded

if TYPE_CHECKING:
    import ray

    from warp_rlhf.config import Config

Weights = Union[FlatWeights, "ray.ObjectRef", str, Path]  # noqa: UP007 (a string member needs Union)


class Merger:
    """Merges one iteration's final policies into θ_slerp, then θ_init of the next iteration by LITI.

    λ = ``warp.lam`` for two runs, 1/k at step k for more; η = ``warp.eta``; method, granularity and
    shard size from the ``merger`` section. ``reference_dir`` (θ_sft's directory) supplies config,
    generation config and tokenizer files of every checkpoint written.
    """

    def __init__(self, config: Config, reference_dir: str | Path, output_dir: str | Path | None = None) -> None:
        self.settings = config.merger
        self.lam, self.eta = config.warp.lam, config.warp.eta
        self.reference_dir = Path(reference_dir)
        self.output_dir = Path(output_dir if output_dir is not None else config.output.dir)

    def merge(
        self, iteration: int, init: Weights, policies: Sequence[Weights], keep: bool = True
    ) -> FlatWeights | None:
        """θ_slerp and θ_init of 1-based ``iteration``, saved under ``iter-<i>/``; returns θ_init (``keep``) or None.

        Without ``keep`` nothing is held whole: each tensor is merged into a buffer reused for the next and
        written out (what a run does: its learners and engines read θ_init from ``iter-<i>/init``)."""
        if not policies:
            raise CheckpointError(f"iteration {iteration}: no policies to merge")
        lam = self.lam if len(policies) == 2 else None
        iteration_dir = self.output_dir / f"iter-{iteration}"
        with ExitStack() as stack, single_threaded():
            init_source = _source(init, stack)
            sources = [_source(p, stack) for p in policies]
            for m, source in enumerate(sources, start=1):
                # Policies may be fp32 (the learners' master weights) over a bf16 θ_init: the maths is fp32.
                check_same_layout(init_source.layout, source.layout, "θ_init", f"policy {m}", dtypes=False)
            with Checkpoint(self.reference_dir) as reference:
                check_same_layout(reference.layout, init_source.layout, str(self.reference_dir), "θ_init", dtypes=False)
            layout = merged_layout(init_source, sources)
            out = allocate((name, d, s, tensor_nbytes(d, s)) for name, (d, s) in layout.items()) if keep else None
            views = dict(out.tensors()) if keep else None
            # Re-running an iteration (resume after a crash) replaces its complete, older outputs.
            writers = [
                stack.enter_context(
                    CheckpointWriter(
                        iteration_dir / kind, layout, self.reference_dir, self.settings.shard_size_mb, True
                    )
                )
                for kind in ("slerp", "init")
            ]
            stream = merge_stream(
                init_source, sources, self.settings.method, lam, self.eta, self.settings.granularity, True, views
            )
            for name, merged, new_init in stream:  # with keep, new_init is views[name], in the returned buffer
                writers[0].write(name, merged)
                writers[1].write(name, new_init)
        return out

    def merge_to_disk(self, iteration: int, init: Weights, policies: Sequence[Weights]) -> dict[str, Any]:
        """``merge`` holding nothing whole, and a few numbers about it (tensors, bytes, seconds, this process's peak
        RSS): what a driver waits on. θ_init is the directory ``iter-<i>/init``."""
        import resource
        import time

        start = time.perf_counter()
        self.merge(iteration, init, policies, keep=False)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, this process's peak so far
        init_dir = self.output_dir / f"iter-{iteration}" / "init"
        with Checkpoint(init_dir) as written:
            tensors, nbytes = len(written.entries), written.nbytes
        return {"iteration": iteration, "init": str(init_dir), "tensors": tensors, "bytes": nbytes,
                "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_kib * 1024}  # fmt: skip


def _source(weights: Any, stack: ExitStack) -> Source:
    """A merge input from FlatWeights, an object reference to FlatWeights, or an HF directory."""
    ray = sys.modules.get("ray")  # an ObjectRef can only exist where ray is already imported
    if ray is not None and isinstance(weights, ray.ObjectRef):
        weights = ray.get(weights)  # zero-copy from the local object store
    if isinstance(weights, FlatWeights):
        return FlatSource(weights)
    if isinstance(weights, str | Path):
        return stack.enter_context(Checkpoint(weights))
    raise CheckpointError(f"cannot merge a {type(weights).__name__}: expected FlatWeights, an ObjectRef or a directory")


class MergerService:
    """``Merger`` as a Ray actor, with ``merger.num_cpus`` from config; one per WARP run."""

    def __init__(self, config: Config, reference_dir: str | Path, placement_group: Any = None) -> None:
        """``placement_group``: the driver's one-bundle reservation for the merger, or None to schedule freely."""
        import ray

        # Absolute paths: the actor's working directory is not the driver's.
        output_dir = Path(config.output.dir).resolve()
        options: dict[str, Any] = {"num_cpus": config.merger.num_cpus}
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, 0)
        actor_class = ray.remote(Merger).options(**options)
        self._actor = actor_class.remote(config, str(Path(reference_dir).resolve()), str(output_dir))

    def merge(self, iteration: int, init: Weights, policies: Sequence[Weights]) -> ray.ObjectRef:
        """Start the merge of one iteration; the reference is to its summary (``Merger.merge_to_disk``).

        The merger holds no model whole: it streams θ_init and the policies tensor by tensor and writes
        ``iter-<i>/slerp`` and ``iter-<i>/init``, from where learners and engines read the next θ_init. ``ray.get``
        of the summary raises the merge's error. Directory inputs must be readable where the actor runs.
        """
        return self._actor.merge_to_disk.remote(iteration, init, list(policies))

    def shutdown(self) -> None:
        import ray

        ray.kill(self._actor)
