"""LearnerGroup: R LearnerRank Ray actors forming one torch.distributed group that act as one learner.

Owns placing the ranks (one bundle each of a Ray placement group: the driver's, or one of its own),
the rendezvous at rank 0's node, building the rank actors (resources from LearnersConfig, never a
decorator), splitting each global batch over ranks by whole prompt groups, merging the ranks'
metrics, and handing weights on: ``weights_ref()`` returns rank 0's ObjectRef (the driver passes the
reference on without pulling the buffer into its own process), and the group is the collective
transport's publisher (:class:`actors.transport.WeightPublisher`): rank 0 broadcasts to the engines
itself. Imports ray lazily; never vLLM.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learners.batching import split_groups

if TYPE_CHECKING:
    import pyarrow as pa
    import ray

    from merger.flat import FlatWeights
    from warp_rlhf.config import LearnersConfig

    Weights = FlatWeights | ray.ObjectRef | str | Path


class LearnerGroup:
    """One learner of ``cfg.ranks`` DeepSpeed ranks; the same API as LearnerRank, driven from the driver."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: LearnersConfig,
        *,
        beta: float,
        mu: float,
        dtype: str = "bfloat16",
        seed: int = 0,
        placement_group: Any = None,
        temperature: float = 1.0,
        sampler_logprobs: str = "raw",
        anchor: str = "ema",
    ) -> None:
        """Start the ranks; ``placement_group`` has one bundle per rank (the driver's), else the group makes one."""
        import ray

        from learners.learner import LearnerRank

        self.cfg = cfg
        self._own_group = placement_group is None
        self.placement_group = placement_group if placement_group is not None else self._make_group(cfg)
        self.master_addr, self.master_port = self._rendezvous()
        remote_rank = ray.remote(LearnerRank)
        common = dict(beta=beta, mu=mu, dtype=dtype, seed=seed, world_size=cfg.ranks, temperature=temperature,
                      sampler_logprobs=sampler_logprobs, anchor=anchor, master_addr=self.master_addr,
                      master_port=self.master_port)  # fmt: skip
        self.ranks = [
            remote_rank.options(
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, scheduling_strategy=self._bundle(r)
            ).remote(str(model_dir), cfg, rank=r, **common)
            for r in range(cfg.ranks)
        ]

    def ready(self) -> None:
        """Wait until every rank has joined the group and built its engine; raises a rank's init error."""
        import ray

        ray.get([r.ready.remote() for r in self.ranks])

    def _rendezvous(self) -> tuple[str, int]:
        """Rank 0's node address and a port free there: the rendezvous every rank joins.

        A zero-CPU probe task in rank 0's bundle finds them; on a one-node cluster whose node is the
        driver's own, the driver does (a probe would start a worker process for nothing).
        """
        import ray

        nodes = [node for node in ray.nodes() if node["Alive"]]
        if len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == ray.util.get_node_ip_address():
            return _node_address()
        probe = ray.remote(num_cpus=0)(_node_address).options(scheduling_strategy=self._bundle(0))
        return ray.get(probe.remote())

    @staticmethod
    def _make_group(cfg: LearnersConfig) -> Any:
        """PACK: on one node when the ranks fit there, over several otherwise (the rendezvous allows it)."""
        import ray
        from ray.util.placement_group import placement_group

        bundle = {"CPU": cfg.num_cpus} | ({"GPU": cfg.num_gpus} if cfg.num_gpus else {})
        group = placement_group([dict(bundle) for _ in range(cfg.ranks)], strategy="PACK")
        ray.get(group.ready())
        return group

    def _bundle(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)

    def step(self, rollouts: pa.Table, timeout_s: float | None = None) -> dict[str, Any]:
        """One update on the global batch: whole prompt groups per rank, metrics merged over ranks."""
        import ray

        parts = split_groups(rollouts.column("group_id").to_numpy(), len(self.ranks))
        refs = [rank.step.remote(rollouts.take(rows)) for rank, rows in zip(self.ranks, parts, strict=True)]
        return merge_metrics(ray.get(refs, timeout=timeout_s))

    def adapter_ref(self, version: int | None = None, master: bool = False) -> ray.ObjectRef:
        """An ObjectRef to rank 0's LoRA adapter (AdapterWeights): megabytes, whatever the transport."""
        import ray

        refs = [rank.adapter.remote(version, master) for rank in self.ranks]  # all ranks: masters may be collective
        ray.get(refs[1:])  # Nones, but their errors must surface
        return refs[0]

    def weights_ref(self, version: int | None = None, master: bool = False) -> ray.ObjectRef:
        """An ObjectRef to the full weights (FlatWeights), produced by rank 0: ``ray.get`` it or pass it on.

        Model dtype for engines; ``master`` gives the optimizer's fp32 master weights (the final policy).
        """
        import ray

        refs = [rank.weights.remote(version, master) for rank in self.ranks]  # all ranks: the gathers are collective
        ray.get(refs[1:])  # Nones, but their errors must surface
        return refs[0]

    def save_policy(self, out_dir: str | Path, reference_dir: str | Path, master: bool = True) -> Path:
        """Rank 0 writes the policy at ``out_dir`` itself (the driver never holds it); returns the directory."""
        import ray

        refs = [rank.save_policy.remote(str(out_dir), str(reference_dir), master) for rank in self.ranks]
        ray.get(refs)
        return Path(out_dir)

    def weights(self, version: int | None = None, master: bool = False) -> FlatWeights:
        import ray

        return ray.get(self.weights_ref(version, master))

    def load_init(self, weights: Weights, anchor: Weights | None = None) -> None:
        """Reset every rank to θ_init (policy, anchor, Adam, warm-up), the anchor to ``anchor`` if given; an HF
        directory is read by every rank, a tensor at a time; a ref is fetched once per node."""
        import ray

        refs = [_shareable(w) for w in (weights, anchor)]
        ray.get([rank.load_init.remote(*refs) for rank in self.ranks])

    def save_state(self, directory: str | Path) -> None:
        """Write resume state to a temporary sibling and rename it into place once every rank is done."""
        import ray

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            ray.get([rank.save_state.remote(str(tmp)) for rank in self.ranks])
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_state(self, directory: str | Path, init: Weights | None = None) -> None:
        """Every rank continues from ``directory``; ``init``: the iteration's θ_init (LoRA: the saved policy's base)."""
        import ray

        ref = _shareable(init)
        ray.get([rank.load_state.remote(str(directory), ref) for rank in self.ranks])

    # ------------------------------------------------------------------------------------------------
    # The collective transport's publisher (actors.transport.WeightPublisher)

    def open_broadcast(
        self, world_size: int, backend: str, bucket_bytes: int, timeout_s: float
    ) -> tuple[str, int, list]:
        """Rank 0 opens the engines' group on its own node (the rendezvous address); (host, port, specs)."""
        import ray

        ref = self.ranks[0].open_weight_sender.remote(self.master_addr, world_size, backend, bucket_bytes, timeout_s)
        return ray.get(ref)

    def connect_broadcast(self) -> list[ray.ObjectRef]:
        return [self.ranks[0].connect_weight_sender.remote()]

    def broadcast(self, version: int) -> list[ray.ObjectRef]:
        """Every rank takes part (ZeRO-3 gathers); rank 0 streams the buckets. ``version`` is the engines' tag."""
        del version  # the engines tag the load; the learner sends whatever it holds now
        return [rank.broadcast_weights.remote() for rank in self.ranks]

    def sender_info(self) -> dict[str, Any]:
        import ray

        return ray.get(self.ranks[0].weight_sender_info.remote())

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
        if self._own_group and self.placement_group is not None:
            remove_placement_group(self.placement_group)
        self.placement_group = None


def _shareable(weights: Any) -> Any:
    """What goes to every rank: an HF directory as its path, FlatWeights put once into the object store."""
    import ray

    if weights is None or isinstance(weights, ray.ObjectRef):
        return weights
    if isinstance(weights, str | Path):
        return str(weights)
    return ray.put(weights)


def merge_drift(per_rank: list[dict[int, list[float]]]) -> dict[str, Any]:
    """drift_mean, drift_max over every token of the step, and drift_by_engine: engine → (mean, max)."""
    totals: dict[int, list[float]] = {}
    for drift in per_rank:
        for engine, (total, count, peak) in drift.items():
            entry = totals.setdefault(int(engine), [0.0, 0.0, 0.0])
            entry[0] += total
            entry[1] += count
            entry[2] = max(entry[2], peak)
    tokens = sum(c for _, c, _ in totals.values())
    return {
        "drift_mean": sum(t for t, _, _ in totals.values()) / tokens if tokens else math.nan,
        "drift_max": max((p for _, _, p in totals.values()), default=math.nan),
        "drift_by_engine": {e: (t / c if c else math.nan, p) for e, (t, c, p) in totals.items()},
    }


def _node_address() -> tuple[str, int]:
    """This node's address as Ray sees it, and a port free on it (run as a task in rank 0's bundle)."""
    import ray

    from learners.distributed import free_port

    return ray.util.get_node_ip_address(), free_port("")


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One learner's metrics from its ranks': means weighted by sequences, sums, the slowest rank's time."""
    sequences = sum(m["sequences"] for m in per_rank)
    merged = {key: sum(m[key] * m["sequences"] for m in per_rank) / sequences for key in ("reward", "kl", "entropy")}
    merged["loss"] = sum(m["loss"] for m in per_rank)  # each rank reports its share of the global loss
    merged["tokens"] = sum(m["tokens"] for m in per_rank)
    merged["sequences"] = sequences
    merged["seconds"] = max(m["seconds"] for m in per_rank)
    for key in (k for k in per_rank[0] if k.startswith("time_")):  # phases: the slowest rank's
        merged[key] = max(m.get(key, 0.0) for m in per_rank)
    merged["skipped"] = any(m["skipped"] for m in per_rank)
    merged.update(merge_drift([m.get("drift_by_engine", {}) for m in per_rank]))
    first = per_rank[0]
    merged.update(grad_norm=first["grad_norm"], lr=first["lr"], step=first["step"])  # global already
    if merged["skipped"]:
        merged.update({k: math.nan for k in ("reward", "kl", "entropy", "loss")})
    return merged
