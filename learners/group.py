"""LearnerGroup: R LearnerRank Ray actors forming one torch.distributed group that act as one learner.

Owns building the rank actors (resources from LearnersConfig, never a decorator), splitting each
global batch over ranks by whole prompt groups, merging the ranks' metrics, and the object-store
hand-off of weights: ``weights()`` returns rank 0's ObjectRef, so the driver passes the reference to
every engine without pulling the buffer into its own process. Imports ray lazily; never vLLM.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learners.batching import split_groups
from learners.distributed import free_port

if TYPE_CHECKING:
    import pyarrow as pa
    import ray

    from merger.flat import FlatWeights
    from warp_rlhf.config import LearnersConfig


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
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
    ) -> None:
        import ray

        from learners.learner import LearnerRank

        self.cfg = cfg
        remote_rank = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(LearnerRank)
        # 127.0.0.1 serves every rank on one node (the CPU and single-node GPU case); ranks spread over
        # nodes need rank 0's node address and a port known to be free there.
        port = master_port or free_port(master_addr)
        common = dict(beta=beta, mu=mu, dtype=dtype, seed=seed, world_size=cfg.ranks)
        self.ranks = [
            remote_rank.remote(str(model_dir), cfg, rank=r, master_addr=master_addr, master_port=port, **common)
            for r in range(cfg.ranks)
        ]
        ray.get([r.ready.remote() for r in self.ranks])  # surface init errors here, not at the first step

    def step(self, rollouts: pa.Table) -> dict[str, Any]:
        """One update on the global batch: whole prompt groups per rank, metrics merged over ranks."""
        import ray

        parts = split_groups(rollouts.column("group_id").to_numpy(), len(self.ranks))
        metrics = ray.get([rank.step.remote(rollouts.take(rows)) for rank, rows in zip(self.ranks, parts, strict=True)])
        return merge_metrics(metrics)

    def weights_ref(self, version: int | None = None) -> ray.ObjectRef:
        """An ObjectRef to the full weights (FlatWeights), produced by rank 0: ``ray.get`` it or pass it on."""
        import ray

        refs = [rank.weights.remote(version) for rank in self.ranks]  # all ranks: ZeRO-3 gathers are collective
        ray.get(refs[1:])  # Nones, but their errors must surface
        return refs[0]

    def weights(self, version: int | None = None) -> FlatWeights:
        import ray

        return ray.get(self.weights_ref(version))

    def load_init(self, weights: FlatWeights | ray.ObjectRef) -> None:
        """Reset every rank to θ_init (policy, anchor, Adam, warm-up); a ref is fetched once per node."""
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        ray.get([rank.load_init.remote(ref) for rank in self.ranks])

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

    def load_state(self, directory: str | Path) -> None:
        import ray

        ray.get([rank.load_state.remote(str(directory)) for rank in self.ranks])

    def shutdown(self) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One learner's metrics from its ranks': means weighted by sequences, sums, the slowest rank's time."""
    sequences = sum(m["sequences"] for m in per_rank)
    merged = {key: sum(m[key] * m["sequences"] for m in per_rank) / sequences for key in ("reward", "kl", "entropy")}
    merged["loss"] = sum(m["loss"] for m in per_rank)  # each rank reports its share of the global loss
    merged["tokens"] = sum(m["tokens"] for m in per_rank)
    merged["sequences"] = sequences
    merged["seconds"] = max(m["seconds"] for m in per_rank)
    merged["skipped"] = any(m["skipped"] for m in per_rank)
    first = per_rank[0]
    merged.update(grad_norm=first["grad_norm"], lr=first["lr"], step=first["step"])  # global already
    if merged["skipped"]:
        merged.update({k: math.nan for k in ("reward", "kl", "entropy", "loss")})
    return merged
