"""Joining or starting the Ray cluster a run uses, checking the run fits it, and reserving its placement groups.

The driver joins an existing cluster when ``resources.address`` or ``$RAY_ADDRESS`` is set (``ray job
submit`` sets it), and starts a local one otherwise, unless it is connected already (a study runs all
its trains and evaluations on one local instance: :func:`shared_local_ray`). Before any actor starts,
the run's placement (:mod:`warp_rlhf.placement`, the same model ``warp-rlhf plan`` prints) is checked
against the live nodes: a cluster that cannot hold the run is an error naming the group that does not
fit, instead of actors waiting forever for resources. Then every learner, engine, the remote reward
model and the merger get a Ray placement group, all removed when the run ends or fails.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warp_rlhf.config import Config
from warp_rlhf.placement import GroupSpec, PlacementError, assign, group_specs, local_node, nodes_from_ray

# Environment every actor process needs: the model cache and vLLM's process mode.
FORWARDED_ENV = ("WARP_RLHF_CACHE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "HF_HUB_OFFLINE")


class ClusterError(RuntimeError):
    """The Ray cluster cannot hold the run as configured."""


def worker_env(cfg: Config) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.actors.multiprocessing else "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


_owned = False  # this process started the Ray instance it is connected to (a local one)


def owns_ray() -> bool:
    """Whether this process started the Ray instance it is connected to: its processes are ours to kill."""
    import ray

    return _owned and ray.is_initialized()


def connect(cfg: Config, specs: list[GroupSpec] | None = None) -> bool:
    """Join or start Ray and check that ``specs`` (default: the whole run) fit; True when this call started Ray.

    An instance this process is already connected to is used as it is (a study trains and evaluates all
    its members on one, see :func:`shared_local_ray`); the caller that started it shuts it down.
    """
    import ray

    address = cfg.resources.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        started = False
    elif address:
        ray.init(address=address, runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=True)
        started = False
    else:
        _start_local(local_node(cfg, specs).resources, worker_env(cfg))  # the node `warp-rlhf plan` assumes
        started = True
    try:
        check_fits(cfg, specs)
    except ClusterError:
        if started:
            shutdown()
        raise
    return started


def _start_local(resources: dict[str, float], env: dict[str, str]) -> None:
    import ray

    global _owned
    custom = {name: amount for name, amount in resources.items() if name != "CPU"}
    ray.init(num_cpus=int(resources["CPU"]), resources=custom, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False)  # fmt: skip
    _owned = True


def shutdown() -> None:
    """Leave Ray (stopping the local instance, if this process started one)."""
    import ray

    global _owned
    ray.shutdown()
    _owned = False


@contextlib.contextmanager
def shared_local_ray(members: list[tuple[Config, list[GroupSpec] | None]]) -> Iterator[None]:
    """One local Ray instance for several runs and evaluations done one after another in this process (a
    study), instead of a start-up (some 15 s on two cores) for each: sized to the largest of them, each
    resource the most any of them needs. Does nothing where they join a cluster or need different worker
    environments (each then connects as it would alone)."""
    import ray

    envs = {tuple(sorted(worker_env(cfg).items())) for cfg, _ in members}
    remote = any(cfg.resources.address for cfg, _ in members) or os.environ.get("RAY_ADDRESS")
    if not members or remote or len(envs) != 1 or ray.is_initialized():
        yield
        return
    resources: dict[str, float] = {}
    for cfg, specs in members:
        for name, amount in local_node(cfg, specs).resources.items():
            resources[name] = max(resources.get(name, 0.0), amount)
    _start_local(resources, dict(next(iter(envs))))
    try:
        yield
    finally:
        shutdown()


def check_fits(cfg: Config, specs: list[GroupSpec] | None = None, model_dir: Path | None = None) -> list[GroupSpec]:
    """The run's groups, checked against the live cluster's nodes: the same checks as `warp-rlhf plan`.

    Placement always; memory too when ``model_dir`` (θ_sft) is given, wherever Ray knows a node's RAM
    (GPU memory is known only for GPU models whose memory size is unambiguous, see warp_rlhf.placement).
    """
    import ray

    from warp_rlhf.model_size import read_model_shape
    from warp_rlhf.plan import plan

    nodes = nodes_from_ray(ray.nodes())
    try:
        assign(cfg, nodes, specs)
    except PlacementError as exc:
        raise ClusterError(f"the Ray cluster cannot hold this run: {exc}") from None
    if model_dir is not None and specs is None:
        failures = plan(cfg, nodes, read_model_shape(Path(model_dir))).failures
        if failures:
            raise ClusterError("the run does not fit the Ray cluster's memory: " + "; ".join(failures))
    return specs if specs is not None else group_specs(cfg, nodes)


class RunPlacement:
    """The run's placement groups, one per GroupSpec, reserved together and removed together."""

    def __init__(self, specs: list[GroupSpec], timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.specs = {spec.name: spec for spec in specs}
        self.groups: dict[str, Any] = {}
        try:
            for spec in specs:
                bundles = [dict(bundle) for bundle in spec.bundles]
                self.groups[spec.name] = placement_group(bundles, strategy=spec.strategy, name=f"warp:{spec.name}")
            self._wait(ray, timeout_s)
        except BaseException:
            self.remove()
            raise

    def _wait(self, ray: Any, timeout_s: float) -> None:
        pending = {name: group.ready() for name, group in self.groups.items()}
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=1.0)
            done = {name for name, ref in pending.items() if ref in ready}
            pending = {name: ref for name, ref in pending.items() if name not in done}
            if pending and time.monotonic() > deadline:
                raise ClusterError(
                    f"Ray did not reserve placement groups {sorted(pending)} within {timeout_s:g} s "
                    "(resources.placement_timeout_s): nodes may be missing or busy; see `ray status`"
                )

    def get(self, name: str) -> Any:
        return self.groups.get(name)

    def describe(self) -> dict[str, Any]:
        """Ray's own record of each group: strategy, bundles, and the node id of every bundle."""
        from ray.util import placement_group_table

        described = {}
        for name, group in self.groups.items():
            table = placement_group_table(group)
            nodes = table.get("bundles_to_node_id", {})
            described[name] = {"strategy": table.get("strategy"), "state": table.get("state"),
                               "bundles": list(table.get("bundles", {}).values()),
                               "bundle_nodes": [nodes.get(i) for i in range(len(nodes))]}  # fmt: skip
        return described

    def learner(self, run: int) -> Any:
        return self.groups[f"run-{run}/learner"]

    def engines(self, run: int) -> list[Any]:
        """Run ``run``'s engine groups; run 0: the groups of the engines every run shares."""
        owner = f"run-{run}" if run else "shared"
        names = sorted((n for n in self.groups if n.startswith(f"{owner}/engine-")), key=_engine_index)
        return [self.groups[n] for n in names]

    def remove(self) -> None:
        """Release every reservation (actors in them are killed by Ray); idempotent."""
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            with contextlib.suppress(Exception):  # already removed, or Ray is shutting down: nothing to release
                remove_placement_group(group)
        self.groups = {}


def check_shared_storage(placement: RunPlacement, output_dir: Path, inputs: list[Path]) -> None:
    """Every node that holds a bundle of the run sees ``output_dir`` as this driver wrote it, and ``inputs``.

    Learner ranks, engines, the reward model and the merger read the model and write into ``output.dir`` wherever
    they run: on node-local disks, a rank's checkpoint or the merger's result would land on its own node, and the
    driver would wait for files it never sees. The driver writes a probe file with a random token into
    ``output_dir``; a zero-CPU task on each node reads it back and checks each input (θ_sft, a reward model) has the
    ``config.json`` the driver sees, byte for byte in size. A node that does not: ClusterError naming it (exit 2).
    """
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted({node for group in placement.describe().values() for node in group["bundle_nodes"] if node})
    token = secrets.token_hex(16)
    probe = output_dir / f".storage-probe-{token}"
    expected = {str(path): (path / "config.json").stat().st_size for path in inputs}
    probe.write_text(token)
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(_storage_seen)
        refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            str(probe), token, expected) for node in nodes]  # fmt: skip
        problems = [problem for problem in ray.get(refs, timeout=120) if problem]
    finally:
        probe.unlink(missing_ok=True)
    if problems:
        raise ClusterError(f"{'; '.join(problems)}: every node of the run must see output.dir and the model "
                           "paths on shared storage (NFS, a cloud filesystem mounted at the same path)")  # fmt: skip


def _storage_seen(probe: str, token: str, expected: dict[str, int]) -> str | None:
    """Run on one node: None when it sees the probe and every input as the driver does, else what it does not."""
    import ray

    address = ray.util.get_node_ip_address()
    try:
        seen = Path(probe).read_text()
    except OSError:
        seen = None
    if seen != token:
        return f"node {address} does not see output.dir {str(Path(probe).parent)!r} as the driver wrote it"
    for path, size in expected.items():
        config = Path(path) / "config.json"
        if not config.is_file() or config.stat().st_size != size:
            return f"node {address} does not see the model {path!r} as the driver does"
    return None


def _engine_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def locate(actors: list[Any]) -> list[dict[str, Any]]:
    """Where each actor runs, as Ray sees it from inside the actor: node id, node address, process id."""
    import ray

    return ray.get([actor.__ray_call__.remote(_where) for actor in actors])


def _where(_instance: Any) -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}  # fmt: skip
