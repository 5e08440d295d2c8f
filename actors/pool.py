"""ActorPool: K GenerationEngines as Ray actors serving one learner.

The pool makes the plain :class:`~actors.engine.GenerationEngine` remote with resources from config
(``ray.remote(num_cpus=..., num_gpus=...)``, never a decorator), each engine in its own placement group
when the driver gives it some (one bundle per tensor-parallel worker, all on one node), splits prompts
across engines in contiguous shards, and returns one table in prompt order. Weights reach the engines
through the transport chosen in config (:mod:`actors.transport`) from a source: FlatWeights, an
ObjectRef to them, or a publisher (the learner). A dead engine is replaced by a fresh one in the same
placement group that gets the latest weights before its shard is retried once; a second failure is a
:class:`PoolError`. A weight load that failed part-way leaves an engine stale (see
:mod:`actors.engine`): the sync treats it as dead. A load refused before writing (the weights' names
or shapes are not the model's) is the source's fault, the same on every engine: the sync raises
PoolError naming the tensors at once, and every engine keeps serving the previous version. With LoRA
slots (``max_loras``), ``sync_adapter`` loads one run's adapter on every engine; replacement engines get
the base and every run's latest adapter. Several runs may share one pool (actors.share_engines), calling
``generate`` and ``sync_adapter`` from their own threads: an engine runs one call at a time, and a dead
engine is replaced once, by whichever thread finds it first.

Imports ray, pyarrow and numpy; vllm only inside the engine actors; never deepspeed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actors.engine import GenerationEngine, WeightMismatchError, prompt_texts
from actors.transport import WeightTransport, make_transport

if TYPE_CHECKING:
    from warp_rlhf.config import ActorsConfig

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """An engine failed again after being replaced, or a weight sync could not be completed."""


class ActorPool:
    """``ActorPool(model_dir, cfg, dtype, seed)``: ``cfg.engines_per_run`` engines; engine i is seeded ``seed + i``."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: ActorsConfig,
        dtype: str = "bfloat16",
        seed: int = 0,
        placement_groups: Sequence[Any] | None = None,
        wait: bool = True,
        max_loras: int = 0,
        max_lora_rank: int = 0,
    ) -> None:
        """Start the engines; with ``wait`` (default) return once they are built, else call :meth:`ready`.

        ``max_loras`` > 0: every engine has that many LoRA slots, of rank up to ``max_lora_rank``."""
        import ray

        if placement_groups is not None and len(placement_groups) != cfg.engines_per_run:
            raise ValueError(f"{len(placement_groups)} placement groups for {cfg.engines_per_run} engines")
        self.model_dir, self.cfg, self.dtype, self.seed = str(model_dir), cfg, dtype, seed
        self.placement_groups = list(placement_groups) if placement_groups is not None else None
        self._remote = ray.remote(GenerationEngine)
        self.lora = (max_loras, max_lora_rank)
        self._adapters: dict[int, tuple[Any, int]] = {}  # run → (ObjectRef to its latest adapter, version)
        self._restarts = 0
        self._replacing = threading.Lock()
        self.engines = self.start_engines()
        if wait:
            self.ready()
        self.transport: WeightTransport = make_transport(
            cfg.weight_transport, cfg.num_gpus, int(cfg.bucket_mb * (1 << 20)), cfg.broadcast_timeout_s
        )
        self.version = 0
        self._source: Any = None  # what the latest sync loaded from, for replacement engines

    def ready(self) -> None:
        """Wait until every engine has built its vLLM engine; raises an engine's start-up error."""
        import ray

        ray.get([engine.ping.remote() for engine in self.engines])

    def start_engines(self) -> list[Any]:
        """Start every engine without waiting for them (the driver starts all runs' actors at once)."""
        return [self._start(i) for i in range(self.cfg.engines_per_run)]

    def _start(self, index: int) -> Any:
        # A replacement gets a seed no engine of this pool used, so it does not replay a random stream.
        seed = self.seed + index + 1000 * self._restarts
        options = self._actor_options(index)
        return self._remote.options(**options).remote(self.model_dir, self.cfg, self.dtype, seed, *self.lora)

    def _actor_options(self, index: int) -> dict[str, Any]:
        cfg = self.cfg
        options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": 0}
        if self.placement_groups is None:
            return options
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if cfg.num_gpus > 0 and cfg.tensor_parallel_size > 1:
            # vLLM's Ray executor starts one worker per bundle of this group (captured as child tasks);
            # the engine actor itself holds bundle 0's CPU share and no GPU.
            options.update(num_cpus=cfg.num_cpus / cfg.tensor_parallel_size, num_gpus=0)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            self.placement_groups[index], placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        return options

    # ---------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompts: Sequence[str] | pa.Table, n: int | None = None, **kwargs: Any) -> pa.Table:
        """Rollouts in prompt order, ``group_id`` = prompt index; ``kwargs`` as in GenerationEngine.generate."""
        import ray

        texts = prompt_texts(prompts, kwargs.pop("prompt_column", "prompt"))
        shards = [(i, lo, texts[lo:hi]) for i, (lo, hi) in enumerate(self._shards(len(texts)))]
        used = list(self.engines)
        refs = {i: used[i].generate.remote(shard, n, group_offset=lo, engine=i, **kwargs) for i, lo, shard in shards}
        tables = []
        for i, lo, shard in shards:
            try:
                tables.append(ray.get(refs[i]))
            except ray.exceptions.RayActorError as exc:
                log.warning("engine %d died during generate (%s); replacing it and retrying its shard", i, exc)
                self._replace(i, used[i])
                try:
                    retry = self.engines[i].generate.remote(shard, n, group_offset=lo, engine=i, **kwargs)
                    tables.append(ray.get(retry))
                except ray.exceptions.RayActorError as again:
                    raise PoolError(f"engine {i} died again after replacement: {again}") from again
        return pa.concat_tables(tables)

    def _shards(self, rows: int) -> list[tuple[int, int]]:
        """Contiguous [lo, hi) row ranges, one per engine (fewer when there are fewer rows than engines)."""
        bounds = np.linspace(0, rows, min(len(self.engines), rows) + 1).astype(int)
        return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def score(self, rollouts: pa.Table, temperature: float = 1.0) -> np.ndarray:
        """Completion log-probabilities at ``temperature`` under the current weights (B,), rows split over engines.

        See GenerationEngine.score: log-softmax(logits / T) over the whole vocabulary, teacher-forced.
        """
        import ray

        parts = [rollouts.slice(lo, hi - lo) for lo, hi in self._shards(rollouts.num_rows)]
        scores = [e.score.remote(part, temperature) for e, part in zip(self.engines, parts, strict=False)]
        return np.concatenate(ray.get(scores))

    def _replace(self, index: int, dead: Any = None) -> None:
        """Start a new engine in slot ``index`` and bring it to the pool's latest weights version.

        ``dead``: the engine handle found dead; when another thread has replaced it already, nothing to do.
        """
        with self._replacing:
            if dead is None or self.engines[index] is dead:
                self._replace_now(index)

    def _replace_now(self, index: int) -> None:
        import ray

        from actors.transport import as_ref

        self._restarts += 1
        ray.kill(self.engines[index], no_restart=True)
        self.engines[index] = self._start(index)
        try:
            if self._source is not None:
                ray.get(self.engines[index].load_weights.remote(as_ref(self._source, self.version), self.version))
            else:
                ray.get(self.engines[index].ping.remote())
            ray.get([self.engines[index].load_adapter.remote(ref, run) for run, (ref, _) in self._adapters.items()])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise PoolError(
                f"replacement engine {index} failed to start or to load weights version {self.version}: {_cause(exc)}"
            ) from exc
        self.transport.reset()  # a collective group no longer has this engine's worker in it

    # ---------------------------------------------------------------------------------------------
    # Weights

    def sync(self, source: Any, version: int) -> None:
        """Load weights version ``version`` on every engine from ``source``.

        ``source``: FlatWeights, an ObjectRef to them (put once by the caller), or a publisher such as
        a LearnerGroup, which sends its current weights itself (the collective transport's sender).
        """
        import ray

        previous = self._source, self.version
        # Kept for replacement engines (exported to the object store only if one is needed).
        self._source, self.version = source, int(version)
        self._adapters.clear()  # a new base: the engines drop the adapters trained on the old one
        try:
            results = self._get_each(self.transport.send(self.engines, source, version))
        except (RuntimeError, ray.exceptions.RayError) as exc:  # the sender's side of a broken broadcast
            log.warning("weight broadcast failed (%s); falling back to the object store", exc)
            self.transport.reset()
            failed = [i for i, alive in enumerate(self._alive()) if not alive]
            self._recover_sync(failed, reload_survivors=True)
            return
        refused = [i for i, r in enumerate(results) if isinstance(r, WeightMismatchError)]
        if refused:  # nothing was written anywhere; a replacement engine would refuse the same source
            self._source, self.version = previous
            error = results[refused[0]]
            raise PoolError(f"engines {refused} refused weights version {version}: {_cause(error)}") from error
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        if failed:
            self._recover_sync(failed, reload_survivors=self.cfg.weight_transport != "object_store")

    def sync_adapter(self, source: Any, version: int, run: int) -> int:
        """Load run ``run``'s adapter version ``version`` on every engine; returns its size in bytes.

        ``source``: AdapterWeights, an ObjectRef to them, or a LoRA learner (it exports its adapter once,
        into the object store). Refused (the adapter's layers are not the model's): PoolError, nothing
        loaded anywhere. An engine that dies or fails the load is replaced (base and every adapter).
        """
        from actors.transport import adapter_ref

        ref = adapter_ref(source, version)
        self._adapters[run] = (ref, int(version))
        used = list(self.engines)
        results = self._get_each(self.transport.send_adapter(used, ref, version, run))
        refused = [i for i, r in enumerate(results) if isinstance(r, WeightMismatchError)]
        if refused:
            del self._adapters[run]
            error = results[refused[0]]
            raise PoolError(f"engines {refused} refused adapter version {version} of run {run}: {_cause(error)}")
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        if failed:
            self._recover_sync(failed, reload_survivors=False, dead=used)
        return max((r for r in results if not isinstance(r, Exception)), default=0)

    def _alive(self) -> list[bool]:
        pings = [engine.ping.remote() for engine in self.engines]
        return [not isinstance(r, Exception) for r in self._get_each(pings, timeout=30)]

    @staticmethod
    def _get_each(refs: list[Any], timeout: float | None = None) -> list[Any]:
        import ray

        results = []
        for ref in refs:
            try:
                results.append(ray.get(ref, timeout=timeout))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError) as exc:
                results.append(exc)  # a task error: a refused load, or one that failed part-way (a stale engine)
        return results

    def _recover_sync(self, failed: list[int], reload_survivors: bool, dead: list[Any] | None = None) -> None:
        """Replace failed engines (they load the latest weights); after a broken broadcast, survivors reload too."""

        log.warning("engines %s died or failed a weight load part-way; replacing them", failed)
        for i in failed:
            self._replace(i, dead[i] if dead is not None else None)
        if reload_survivors:
            from actors.transport import as_ref

            survivors = [i for i in range(len(self.engines)) if i not in failed]
            latest = as_ref(self._source, self.version)
            loads = [self.engines[i].load_weights.remote(latest, self.version) for i in survivors]
            errors = {i: r for i, r in zip(survivors, self._get_each(loads), strict=True) if isinstance(r, Exception)}
            if errors:
                first = _cause(next(iter(errors.values())))
                raise PoolError(
                    f"weight sync to version {self.version} failed twice on engines {list(errors)}: {first}"
                )
        versions = self.versions()
        if any(v != self.version for v in versions):
            raise PoolError(f"engines hold weight versions {versions} after sync to {self.version}")

    def versions(self) -> list[int]:
        import ray

        return ray.get([engine.weights_version.remote() for engine in self.engines])

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every engine's vLLM core (waiting at most ``timeout_s`` for each), then end the actors; idempotent."""
        import ray

        self.transport.reset()
        engines, self.engines = self.engines, []
        stops = [engine.shutdown.remote() for engine in engines]
        for engine, stop in zip(engines, stops, strict=True):
            # An engine already dead has nothing left to release but the actor itself.
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.get(stop, timeout=timeout_s)
            ray.kill(engine, no_restart=True)
        self._source = None


def _cause(error: BaseException) -> BaseException:
    """The engine's own exception inside a Ray task error (its message names the tensors or the failure)."""
    return getattr(error, "cause", None) or error
