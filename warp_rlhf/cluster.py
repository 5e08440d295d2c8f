"""Joining or starting the Ray cluster a run uses, and checking it can hold the run before any actor starts.

The driver joins an existing cluster when ``resources.address`` or ``$RAY_ADDRESS`` is set (``ray job
submit`` sets it), and starts a local one otherwise. Either way, a cluster too small for the config is
an error naming what is missing, instead of actors that wait forever for resources.
"""

from __future__ import annotations

import math
import os

from warp_rlhf.config import Config

# Environment every actor process needs: caches, compiled-op location and vLLM's process mode.
FORWARDED_ENV = ("WARP_RLHF_CACHE", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_NUM_OF_RESERVED_CPU", "HF_HUB_OFFLINE")


class ClusterError(RuntimeError):
    """The Ray cluster cannot hold the run as configured."""


def required_resources(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs held at once: M runs × (K engines + R learner ranks), the merger, a remote reward."""
    a, lr, m = cfg.actors, cfg.learners, cfg.warp.runs
    cpus = m * (a.engines_per_run * a.num_cpus + lr.ranks * lr.num_cpus) + cfg.merger.num_cpus
    gpus = m * (a.engines_per_run * a.num_gpus + lr.ranks * lr.num_gpus)
    if cfg.reward.remote:
        cpus += cfg.reward.num_cpus
        gpus += cfg.reward.num_gpus
    return {"CPU": cpus, "GPU": gpus}


def worker_env(cfg: Config) -> dict[str, str]:
    from warp_rlhf.models import cache_root

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # DeepSpeed's compiled ops live beside the model cache (where `make` prebuilds them), not per user tool.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.actors.multiprocessing else "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def connect(cfg: Config) -> bool:
    """Join or start Ray and check its resources; returns True when this call started the cluster."""
    import ray

    address = cfg.resources.address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": worker_env(cfg)}
    need = required_resources(cfg)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        started = False
    else:
        # A local cluster is sized to the run: logical CPUs are a scheduling device, not a thread count.
        cpus = cfg.resources.num_cpus or max(os.cpu_count() or 1, math.ceil(need["CPU"]))
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        started = True
    try:
        check_resources(need, ray.cluster_resources())
    except ClusterError:
        if started:
            ray.shutdown()
        raise
    return started


def check_resources(need: dict[str, float], have: dict[str, float]) -> None:
    missing = [
        f"{need[k]:g} {k}s (cluster has {have.get(k, 0):g})" for k in ("CPU", "GPU") if need[k] > have.get(k, 0) + 1e-9
    ]
    if missing:
        raise ClusterError(
            "the Ray cluster is too small for this config: it needs "
            + " and ".join(missing)
            + "; lower actors/learners num_cpus/num_gpus, warp.runs, or add nodes"
        )
