"""Where every actor of a run goes: the run's placement groups and a first-fit model of how Ray packs them.

Owns the shape of the placement groups (:func:`group_specs`: one per learner, one per engine, the remote
reward model, the merger), the cluster's nodes as Ray would see them (from ``cluster.yaml``, from the list
``ray.nodes()`` returns, or this machine alone), and :func:`assign`, a greedy model of where each bundle
lands, so a config that cannot fit fails with a message naming the group before any actor starts.

Pure: the standard library, PyYAML and the config only. Never imports Ray and never calls it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from warp_rlhf.config import ActorsConfig, Config

NODE_MARK = 0.001
"""How much of a node-type marker resource (``resources.learner_resource`` etc.) each bundle asks for."""
TOLERANCE = 1e-9
BUILT_IN = ("CPU", "GPU", "memory", "object_store_memory")


class PlacementError(ValueError):
    """The run's actors do not fit on the nodes; the message names the group and what it lacks."""


class ClusterFileError(PlacementError):
    """A cluster launcher file is missing, not YAML, or lists no node types."""


@dataclass(frozen=True)
class GroupSpec:
    """One Ray placement group: its bundles (resource dicts) and packing strategy."""

    name: str
    """``run-1/learner``, ``run-1/engine-2``, ``shared/engine-1`` (actors.share_engines), ``reward``, ``merger``
    (runs and engines count from 1)."""
    role: str
    """learner, engine, reward or merger."""
    run: int
    """1-based run index; 0 for the reward model, the merger and engines shared by every run."""
    bundles: tuple[dict[str, float], ...]
    """One per learner rank, one per tensor-parallel worker of an engine."""
    strategy: str
    """STRICT_PACK (all bundles on one node) or PACK (spread when one node is too small)."""


@dataclass(frozen=True)
class Node:
    """One node of the cluster, as Ray schedules it."""

    name: str
    """Node type and index (``learner-0``) for a cluster file; the node's IP (or IP/id) for a live cluster."""
    node_type: str
    """``head``, ``learner``, ``rollout``, ...; on a live cluster from its custom resources, else ``node``."""
    resources: dict[str, float]
    """Ray resources: CPU, GPU and custom ones such as learner_node."""
    gpu_memory_gib: float | None
    """Memory of one GPU as the CUDA allocator sees it; None when unknown."""
    memory_gib: float | None
    """Node RAM; None when unknown."""
    ip: str = ""


@dataclass(frozen=True)
class Instance:
    cpus: int
    gpus: int
    gpu: str
    gpu_memory_gib: float | None
    memory_gib: float


# GPU memory is the total torch.cuda reports (below the marketing GB: ECC and driver reservations),
# e.g. "GPU 0 has a total capacity of 44.53 GiB" on an L40S.
INSTANCE_TYPES: dict[str, Instance] = {
    "p4d.24xlarge": Instance(96, 8, "A100 40GB", 39.4, 1152),
    "p4de.24xlarge": Instance(96, 8, "A100 80GB", 79.1, 1152),
    "p5.48xlarge": Instance(192, 8, "H100 80GB", 79.1, 2048),
    "g5.12xlarge": Instance(48, 4, "A10G", 22.0, 192),
    "g5.48xlarge": Instance(192, 8, "A10G", 22.0, 768),
    "g6.12xlarge": Instance(48, 4, "L4", 22.0, 192),
    "g6e.12xlarge": Instance(48, 4, "L40S", 44.4, 384),
    "g6e.48xlarge": Instance(192, 8, "L40S", 44.4, 1536),
    "m6i.8xlarge": Instance(32, 0, "", None, 128),
}
# Ray's accelerator_type:<name> resources, only where the name fixes the memory (A100 and H100 do not).
ACCELERATOR_MEMORY_GIB = {"L40S": 44.4, "A10G": 22.0, "L4": 22.0}


# ---------------------------------------------------------------------------------------------------
# The run's placement groups


def _bundle(cpus: float, gpus: float, mark: str) -> dict[str, float]:
    bundle = {"CPU": cpus}
    if gpus > 0:
        bundle["GPU"] = gpus
    if mark:
        bundle[mark] = NODE_MARK
    return bundle


def _engine_bundles(cfg: ActorsConfig, mark: str) -> tuple[dict[str, float], ...]:
    if cfg.num_gpus == 0:  # vLLM on CPU: always one worker
        return (_bundle(cfg.num_cpus, 0, mark),)
    tp = cfg.tensor_parallel_size
    return tuple(_bundle(cfg.num_cpus / tp, 1.0, mark) for _ in range(tp))


def _total(bundles: tuple[dict[str, float], ...] | list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + amount
    return total


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(amount <= have.get(key, 0.0) + TOLERANCE for key, amount in need.items())


def _eligible(nodes: list[Node], mark: str) -> list[Node]:
    return [n for n in nodes if n.resources.get(mark, 0.0) > 0] if mark else list(nodes)


def group_specs(cfg: Config, nodes: list[Node]) -> list[GroupSpec]:
    """Learners (runs 1..M), engines, the remote reward model, the merger: in the order :func:`assign` places them.

    A learner is STRICT_PACK when one eligible node could hold all its ranks, PACK (ranks on several nodes,
    rendezvous at rank 0's node) when none could.
    """
    a, lr, res, runs = cfg.actors, cfg.learners, cfg.resources, range(1, cfg.warp.runs + 1)
    learner = (_bundle(lr.num_cpus, lr.num_gpus, res.learner_resource),) * lr.ranks
    whole = any(_fits(_total(learner), n.resources) for n in _eligible(nodes, res.learner_resource))
    groups = [GroupSpec(f"run-{m}/learner", "learner", m, learner, "STRICT_PACK" if whole else "PACK") for m in runs]
    engine = _engine_bundles(a, res.rollout_resource)
    owners = [(0, "shared")] if a.share_engines else [(m, f"run-{m}") for m in runs]
    groups += [
        GroupSpec(f"{owner}/engine-{k}", "engine", m, engine, "STRICT_PACK")
        for m, owner in owners
        for k in range(1, a.engines_per_run + 1)
    ]
    if cfg.reward.remote:
        reward = (_bundle(cfg.reward.num_cpus, cfg.reward.num_gpus, res.rollout_resource),)
        groups.append(GroupSpec("reward", "reward", 0, reward, "STRICT_PACK"))
    groups.append(GroupSpec("merger", "merger", 0, ({"CPU": cfg.merger.num_cpus},), "STRICT_PACK"))
    return groups


# ---------------------------------------------------------------------------------------------------
# First-fit assignment


def assign(cfg: Config, nodes: list[Node], specs: list[GroupSpec] | None = None) -> dict[str, list[str]]:
    """Group name → the node of each of its bundles, in bundle order; PlacementError when a group does not fit.

    ``specs``: the groups to place, in order (default: the whole run, :func:`group_specs`).
    """
    free = {n.name: dict(n.resources) for n in nodes}
    hosted: dict[str, list[str]] = {n.name: [] for n in nodes}  # groups already on each node, for messages
    placement: dict[str, list[str]] = {}
    for group in group_specs(cfg, nodes) if specs is None else specs:
        chosen = _place_together(group, nodes, free) if group.strategy == "STRICT_PACK" else _spread(group, nodes, free)
        if chosen is None:
            raise PlacementError(_explain(group, cfg, nodes, free, hosted))
        for name, bundle in zip(chosen, group.bundles, strict=True):
            for key, amount in bundle.items():
                free[name][key] -= amount
            if group.name not in hosted[name]:
                hosted[name].append(group.name)
        placement[group.name] = chosen
    return placement


def _place_together(group: GroupSpec, nodes: list[Node], free: dict[str, dict[str, float]]) -> list[str] | None:
    need = _total(group.bundles)
    node = next((n for n in nodes if _fits(need, free[n.name])), None)
    return None if node is None else [node.name] * len(group.bundles)


def _spread(group: GroupSpec, nodes: list[Node], free: dict[str, dict[str, float]]) -> list[str] | None:
    """Bundle by bundle, onto the node that fits it and already holds most of the group (first such node)."""
    left = {n.name: dict(free[n.name]) for n in nodes}
    chosen: list[str] = []
    for bundle in group.bundles:
        fitting = [i for i, n in enumerate(nodes) if _fits(bundle, left[n.name])]
        if not fitting:
            return None
        best = nodes[max(fitting, key=lambda i: (chosen.count(nodes[i].name), -i))].name
        for key, amount in bundle.items():
            left[best][key] -= amount
        chosen.append(best)
    return chosen


def _describe(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key}: {amount:g}" for key, amount in bundle.items()) + "}"


def _units(amount: float, key: str) -> str:
    plural = "s" if key in ("CPU", "GPU") and amount != 1 else ""
    return f"{amount:g} {key}{plural}"


def _mark_of(group: GroupSpec, cfg: Config) -> tuple[str, str]:
    """(marker resource, the config key that names it) of a group; ("", "") when it may go anywhere."""
    if group.role == "learner":
        return cfg.resources.learner_resource, "resources.learner_resource"
    if group.role in ("engine", "reward"):
        return cfg.resources.rollout_resource, "resources.rollout_resource"
    return "", ""


def _explain(
    group: GroupSpec, cfg: Config, nodes: list[Node], free: dict[str, dict[str, float]], hosted: dict[str, list[str]]
) -> str:
    mark, key_name = _mark_of(group, cfg)
    kind = f"{mark.removesuffix('_node')} node" if mark else "node"
    count = len(group.bundles)
    what = f"{group.name} needs {count} bundle{'s' if count > 1 else ''} of {_describe(group.bundles[0])}"
    candidates = _eligible(nodes, mark)
    if not nodes:
        return f"{what}: there are no nodes"
    if not candidates:
        return (
            f"{what}: no node has the custom resource {mark!r} (add it to a node type's resources in the "
            f"cluster file, or set {key_name} to empty)"
        )
    if group.strategy == "PACK":
        bundle = group.bundles[0]
        room = sum(_how_many(bundle, free[n.name]) for n in candidates)
        scarce = min(bundle, key=lambda k: sum(free[n.name].get(k, 0.0) / bundle[k] for n in candidates))
        left = "; ".join(_left(n, scarce, free, hosted) for n in candidates[:4])
        return f"{what} spread over {kind}s (PACK), but the {kind}s have room for only {room} ({left})"
    need = _total(group.bundles)
    best = max(candidates, key=lambda n: _coverage(need, free[n.name]))
    short = next((k for k in need if need[k] > free[best.name].get(k, 0.0) + TOLERANCE), "CPU")
    left = _left(best, short, free, hosted)
    return f"{what} on one node (STRICT_PACK): no {kind} has {_units(need[short], short)} free ({left})"


def _left(node: Node, key: str, free: dict[str, dict[str, float]], hosted: dict[str, list[str]]) -> str:
    after = f" after {', '.join(hosted[node.name])}" if hosted[node.name] else ""
    have = max(0.0, free[node.name].get(key, 0.0))
    return f"{node.name} has {have:g} of {_units(node.resources.get(key, 0.0), key)} left{after}"


def _how_many(bundle: dict[str, float], have: dict[str, float]) -> int:
    return min(math.floor((have.get(k, 0.0) + TOLERANCE) / amount) for k, amount in bundle.items() if amount > 0)


def _coverage(need: dict[str, float], have: dict[str, float]) -> tuple[int, float]:
    """(keys fully covered, the worst fraction covered): larger is a better candidate."""
    fractions = [min(1.0, max(0.0, have.get(k, 0.0)) / amount) for k, amount in need.items() if amount > 0]
    return sum(f >= 1.0 for f in fractions), min(fractions, default=1.0)


# ---------------------------------------------------------------------------------------------------
# Nodes: a cluster launcher file, a live cluster, this machine


def nodes_from_cluster_yaml(path: str | Path) -> list[Node]:
    """The head once and each worker type ``min_workers`` times (autoscaled nodes above that are not counted)."""
    path = Path(path)
    if not path.is_file():
        raise ClusterFileError(f"cluster file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClusterFileError(f"cluster file {str(path)!r} is not valid YAML: {exc}") from None
    types = values.get("available_node_types") if isinstance(values, dict) else None
    if not isinstance(types, dict) or not types:
        raise ClusterFileError(f"cluster file {str(path)!r} has no available_node_types: not a Ray cluster file")
    head = values.get("head_node_type")
    if head not in types:
        raise ClusterFileError(f"cluster file {str(path)!r}: head_node_type {head!r} is not in available_node_types")
    nodes = []
    for type_name, spec in types.items():
        resources, instance = _node_type_resources(path, type_name, spec)
        count = 1 if type_name == head else int(spec.get("min_workers", 0))
        gpu_memory = instance.gpu_memory_gib if instance else None
        memory = instance.memory_gib if instance else None
        nodes += [Node(f"{type_name}-{i}", type_name, dict(resources), gpu_memory, memory) for i in range(count)]
    return nodes


def _node_type_resources(path: Path, type_name: str, spec: Any) -> tuple[dict[str, float], Instance | None]:
    where = f"cluster file {str(path)!r}: available_node_types.{type_name}"
    if not isinstance(spec, dict) or not isinstance(spec.get("resources", {}), dict):
        raise ClusterFileError(f"{where}: expected a mapping with a resources mapping")
    try:
        resources = {str(k): float(v) for k, v in spec.get("resources", {}).items()}
    except (TypeError, ValueError):
        raise ClusterFileError(f"{where}.resources: every value must be a number") from None
    node_config = spec.get("node_config") or {}
    instance = INSTANCE_TYPES.get(str(node_config.get("InstanceType", ""))) if isinstance(node_config, dict) else None
    if instance is not None:  # Ray detects CPUs and GPUs itself when the file leaves them out
        resources.setdefault("CPU", float(instance.cpus))
        resources.setdefault("GPU", float(instance.gpus))
    return resources, instance


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """Alive nodes of ``ray.nodes()``. RAM is Ray's memory plus object-store resources (what Ray saw at start)."""
    alive = [n for n in ray_nodes if n.get("Alive")]
    ips = Counter(n.get("NodeManagerAddress", "") for n in alive)
    nodes = []
    for raw in alive:
        resources = {str(k): float(v) for k, v in (raw.get("Resources") or {}).items()}
        ip = raw.get("NodeManagerAddress", "")
        name = ip if ip and ips[ip] == 1 else f"{ip or 'node'}/{str(raw.get('NodeID', ''))[:8]}"
        memory = resources.get("memory", 0.0) + resources.get("object_store_memory", 0.0)
        gpu_memory = next(
            (gib for acc, gib in ACCELERATOR_MEMORY_GIB.items() if resources.get(f"accelerator_type:{acc}")), None
        )
        nodes.append(Node(name, _ray_node_type(resources), resources, gpu_memory, memory / 2**30 or None, ip))
    return nodes


def _ray_node_type(resources: dict[str, float]) -> str:
    custom = sorted(k for k in resources if k not in BUILT_IN and not k.startswith(("node:", "accelerator_type:")))
    if custom:
        return "+".join(k.removesuffix("_node") for k in custom)
    return "head" if "node:__internal_head__" in resources else "node"


def local_node(cfg: Config, specs: list[GroupSpec] | None = None) -> Node:
    """This machine as the one node of the local cluster the driver starts (warp_rlhf.cluster.connect): no GPUs,
    CPUs sized to ``specs`` (default: the whole run; logical CPUs are a scheduling device), and the config's
    node-role resources."""
    need = sum(bundle.get("CPU", 0.0) for spec in specs or group_specs(cfg, []) for bundle in spec.bundles)
    resources = {"CPU": float(cfg.resources.num_cpus or max(os.cpu_count() or 1, math.ceil(need)))}
    for mark in (cfg.resources.learner_resource, cfg.resources.rollout_resource):
        if mark:
            resources[mark] = 1.0
    return Node("local", "local", resources, None, _meminfo_gib(), "127.0.0.1")


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None
