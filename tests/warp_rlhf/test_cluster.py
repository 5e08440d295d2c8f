"""Cluster runs: cluster.yaml against Ray's own schema, and `ray job submit` to a simulated multi-node cluster.

The cluster is this test's own, shaped like cluster.yaml in miniature: a head on 127.0.0.1 (driver, merger),
two "learner" nodes (custom resource `learner_node`) on 127.0.0.2 and 127.0.0.3 and a "rollout" node
(`rollout_node`) on 127.0.0.4, each a `ray start --block` process with its own address, ports and resources
and a random auth token. It is stopped through those processes only: never `ray stop`, which would kill
every Ray process on the machine, including other test sessions'. What the tests assert about placement
comes from Ray's own state (`ray list actors/nodes/placement-groups`), cross-checked with the run's
placement.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.processes import processes_with
from warp_rlhf.hardware import native_bf16_cpu

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # this environment's `ray` and `python`, as on a cluster node
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900  # the smoke run takes ~1.5 min alone, several on a loaded 2-core machine


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _cluster_yaml()
    jsonschema.validate(config, schema)  # a misspelt or misplaced key fails here
    validate_config(prepare_config(config))  # what `ray up` runs: defaults merged, node types consistent


def test_cluster_yaml_keeps_job_api_private_and_installs_gpu_extra() -> None:
    config = _cluster_yaml()
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    opened = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(not (rule["FromPort"] <= 8265 <= rule["ToPort"]) for rule in opened)
    setup = " ".join(config["setup_commands"])
    assert "--override install/overrides.txt" in setup and '-e ".[gpu]"' in setup
    assert config["file_mounts"]["~/warp-rlhf"] == "."


# --- a simulated multi-node cluster and `ray job submit` ---------------------------------------------------------


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: Path
    dashboard: str  # http://127.0.0.1:<port>
    gcs_port: int
    env: dict[str, str]  # what `ray` clients need: this environment first on PATH, the token
    workers: list[subprocess.Popen] = field(default_factory=list)


# (address, CPUs, custom resources): cluster.yaml's node types in miniature. The learner nodes differ in
# size so that one test's learner fits one node (STRICT_PACK) and another's must span two (PACK).
WORKER_NODES = [
    ("127.0.0.2", 2, {"learner_node": 1}),
    ("127.0.0.3", 1, {"learner_node": 1}),
    ("127.0.0.4", 2, {"rollout_node": 1}),
]
NODE_ROLES = ["resources.learner_resource=learner_node", "resources.rollout_resource=rollout_node"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _start_head(temp_dir: Path, log: Path) -> Head:
    gcs, dashboard, client, agent = _free_ports(4)
    token = secrets.token_hex(32)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1"]
    cmd += ["--node-ip-address", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port"]
    cmd += [str(client), "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp_dir), "--num-cpus", "2"]
    cmd += ["--num-gpus", "0", "--disable-usage-stats"]
    with open(log, "w") as sink:
        process = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(process, temp_dir, f"http://127.0.0.1:{dashboard}", gcs, env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if _ray(head, "job", "list", timeout=60).returncode == 0:  # the job API answers, with our token
            return head
        time.sleep(2)
    _stop_head(head)
    pytest.fail(f"head not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _add_workers(head: Head, logs: Path, nodes: list = WORKER_NODES, masked: Path | None = None) -> None:
    """Start ``nodes`` one by one (each its own address and ports), each alive in Ray before the next.

    One at a time: on 2 cores, raylets starting together time out registering with the GCS. A node that
    fails to come up is started again (twice at most). ``masked``: the nodes run in their own mount namespace,
    with an empty tmpfs over that directory (a node that does not share the driver's storage there).
    """
    for address, cpus, resources in nodes:
        for attempt in (1, 2, 3):
            agent, grpc, metrics, runtime_env = _free_ports(4)
            cmd = [str(BIN / "ray"), "start", "--block", "--address", f"127.0.0.1:{head.gcs_port}"]
            if masked is not None:
                mount = f'mount -t tmpfs tmpfs {masked} && exec "$0" "$@"'
                cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, *cmd]
            cmd += ["--node-ip-address", address, "--num-cpus", str(cpus), "--num-gpus", "0", "--resources"]
            cmd += [json.dumps(resources), "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port"]
            cmd += [str(grpc), "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env)]
            cmd += ["--disable-usage-stats"]
            with open(logs / f"node-{address}-{attempt}.log", "w") as sink:
                process = subprocess.Popen(
                    cmd, env=head.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            head.workers.append(process)
            if _wait_for_node(head, address, process):
                break
            _kill_node(head, address)  # a raylet of the failed attempt must not register later, twice
        else:
            pytest.fail(f"node {address} did not start in 3 attempts: see {logs}/node-{address}-*.log")


def _kill_node(head: Head, address: str) -> None:
    """SIGKILL this cluster's processes that belong to the node at ``address`` (after a failed start)."""
    marker = f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}"
    for pid in list(processes_with(marker)):
        with contextlib.suppress(OSError):
            if address.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def _wait_for_node(head: Head, address: str, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if any(n["node_ip"] == address and n["state"] == "ALIVE" for n in _state(head, "nodes")):
            return True
        time.sleep(2)
    return False


def _state(head: Head, kind: str, attempts: int = 10) -> list[dict]:
    """Ray's own state (`ray list <kind> --detail`), dead actors and removed groups included.

    The CLI prints "No resource in the cluster" instead of an empty JSON list (right after the head
    starts, even for nodes); any other output that is not JSON is asked for again.
    """
    cmd = ["list", kind, "--address", head.dashboard, "--detail", "--format", "json", "--limit", "10000"]
    for _ in range(attempts):
        result = _ray(head, *cmd, timeout=120)
        out = result.stdout.strip()
        if result.returncode == 0 and out.startswith("["):
            return json.loads(out)
        if result.returncode == 0 and out.startswith("No resource"):
            return []
        time.sleep(3)
    raise AssertionError(f"`ray list {kind}` gave no state ({result.returncode}): {result.stderr[-2000:]}")


def _stop_head(head: Head) -> None:
    """SIGTERM `ray start --block` alone (it drains and stops its daemons), then SIGKILL any straggler."""
    marker = f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}"
    for process in [*head.workers, head.process]:  # workers first: they drain towards a live head
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=90)
    for _ in range(3):  # workers may be mid-spawn; kill only processes carrying this head's token
        leftovers = list(processes_with(marker))
        if not leftovers:
            return
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
    head.process.wait(timeout=10)


def _ray(head: Head, *args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), *args]
    if args[0] == "job":  # right after the subcommand: in `job submit`, whatever follows `--` is the entrypoint
        cmd[3:3] = ["--address", head.dashboard]
    return subprocess.run(cmd, env=head.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short path: Ray's unix sockets live under the temp dir and must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="wr-ray-", dir="/tmp"))
    head = _start_head(temp_dir, temp_dir / "head.log")
    try:
        _add_workers(head, temp_dir)
        yield head
    finally:
        _stop_head(head)
        assert not processes_with(f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(
    head: Head, job_id: str, *overrides: str, config: str = "configs/smoke.yaml"
) -> subprocess.CompletedProcess:
    """`ray job submit` as the README gives it, waiting for the end (the CLI tails the job's logs)."""
    train = ["python", "-m", "warp_rlhf", "train", "--config", config, *overrides]
    args = ["job", "submit", "--submission-id", job_id, "--working-dir", "."]
    return _ray(head, *args, "--", *train, timeout=JOB_TIMEOUT_S)


def _status(head: Head, job_id: str) -> str:
    """The job's state from the job REST API (what `ray job status` prints, without the prose)."""
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def _nodes_with(head: Head, resource: str) -> dict[str, str]:
    """node id → address of the alive nodes that declare ``resource``."""
    return {n["node_id"]: n["node_ip"] for n in _state(head, "nodes") if resource in n["resources_total"]}


def _actors(head: Head, class_name: str) -> dict[int, dict]:
    """pid → Ray's record of every actor of ``class_name`` (alive or dead) in the cluster."""
    return {a["pid"]: a for a in _state(head, "actors") if a["class_name"] == class_name}


# configs/gpu-7b.yaml in miniature: the tiny model and a tiny reward model, on CPUs, ranks capped at 2, one engine a
# run, a few steps. Everything else is the recipe's own: ZeRO-3 at DeepSpeed's default persistence threshold, bf16,
# the collective transport, vLLM's engine core in its own process, a remote hf reward, micro-batches of 4, no step
# checkpoints at this length, and its node roles (resources.learner_resource / rollout_resource).
GPU_7B_IN_MINIATURE = [
    "model.path=tiny-llama", "learners.ranks=2", "learners.num_cpus=0.5", "learners.num_gpus=0",
    "actors.engines_per_run=1", "actors.num_cpus=0.5", "actors.num_gpus=0", "actors.tensor_parallel_size=1",
    "actors.max_model_len=256", "actors.kv_cache_gib=0.25", "actors.max_new_tokens=16", "actors.bucket_mb=0.25",
    "reward.num_cpus=0.25", "reward.num_gpus=0", "warp.iterations=2", "warp.steps=[2,2]", "warp.prompts_per_step=4",
]  # fmt: skip


@pytest.mark.ray
@pytest.mark.vllm
def test_job_submit_trains_the_7b_recipe_in_miniature_on_a_multi_node_cluster(
    head: Head, tmp_path: Path, classifier_dir: Path
) -> None:
    """configs/gpu-7b.yaml at its own stage, threshold, dtype and transport: each run a 2-rank ZeRO-3 learner on a
    learner node, weights broadcast by the learner over gloo to its engine on the rollout node (several engines in
    one broadcast group: tests/actors/test_transport.py)."""
    out = tmp_path / "run"
    result = _submit(head, "warp-7b", f"output.dir={out}", f"reward.path={classifier_dir}", *GPU_7B_IN_MINIATURE,
                     config="configs/gpu-7b.yaml")  # fmt: skip
    assert _status(head, "warp-7b") == "SUCCEEDED", result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0
    for i in (1, 2):
        for sub in ("run-1", "run-2", "slerp", "init"):
            assert (out / f"iter-{i}" / sub / "model.safetensors").is_file(), f"iter-{i}/{sub}"
    assert (out / "metrics.parquet").is_file() and (out / "config.yaml").is_file()

    learner_nodes, rollout_nodes = _nodes_with(head, "learner_node"), _nodes_with(head, "rollout_node")
    ranks, engines = _actors(head, "LearnerRank"), _actors(head, "GenerationEngine")
    record = json.loads((out / "placement.json").read_text())
    assert len(record["runs"]) == 2
    for run in record["runs"]:
        rank_nodes = {ranks[r["pid"]]["node_id"] for r in run["learner_ranks"]}  # Ray's record of those processes
        assert len(rank_nodes) == 1 and rank_nodes <= set(learner_nodes), run  # one learner node per learner
        (node,) = rank_nodes
        assert run["master_addr"] == learner_nodes[node] != "127.0.0.1"  # rendezvous at rank 0's own node
        assert {engines[e["pid"]]["node_id"] for e in run["engines"]} <= set(rollout_nodes)
        sender = run["weight_sender"]
        assert sender["pid"] == run["learner_ranks"][0]["pid"] != record["driver_pid"]  # the learner sent
        assert sender["address"].startswith(f"{run['master_addr']}:") and sender["broadcasts"] >= 2
    # Strategies as Ray's placement_group_table reported them during the run (the state API has none).
    assert {record["groups"][f"run-{m}/learner"]["strategy"] for m in (1, 2)} == {"STRICT_PACK"}
    groups = [g for g in _state(head, "placement-groups") if g["name"].startswith("warp:")]
    # merger, reward model, and per run a learner and an engine: all released at the end
    assert len(groups) == 2 + 2 * 2 and all(g["state"] == "REMOVED" for g in groups), groups
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["learners"]["zero_stage"] == 3 and config["learners"]["zero3_persistence_threshold"] == 100_000
    assert config["model"]["dtype"] == "bfloat16" and config["actors"]["multiprocessing"] is True
    # The working directory went up without what .gitignore names (the virtualenv, caches, runs).
    unpacked = head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    (package,) = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]  # beside it: the downloaded zip
    shipped = {p.name for p in package.iterdir()}
    assert {"warp_rlhf", "actors", "learners", "merger", "configs"} <= shipped
    assert not shipped & {".venv", ".cache", "runs", ".git"}, shipped


@pytest.mark.ray
@pytest.mark.vllm
def test_a_learner_bigger_than_any_node_spans_two_nodes(head: Head, tmp_path: Path) -> None:
    """3 ranks of 1 CPU: no learner node has 3 CPUs, both together do; the ranks rendezvous at rank 0's node."""
    out = tmp_path / "run"
    shape = ["warp.runs=1", "warp.iterations=1", "learners.ranks=3", "learners.num_cpus=1"]
    result = _submit(head, "warp-span", f"output.dir={out}", *shape, *NODE_ROLES)
    assert _status(head, "warp-span") == "SUCCEEDED", result.stdout[-4000:] + result.stderr[-2000:]
    assert (out / "iter-1" / "init" / "model.safetensors").is_file()
    (run,) = json.loads((out / "placement.json").read_text())["runs"]
    ranks, learner_nodes = _actors(head, "LearnerRank"), _nodes_with(head, "learner_node")
    nodes = [ranks[r["pid"]]["node_id"] for r in run["learner_ranks"]]
    assert len(set(nodes)) == 2 and set(nodes) <= set(learner_nodes)
    assert run["master_addr"] == learner_nodes[nodes[0]]  # every rank joined rank 0's node
    assert json.loads((out / "placement.json").read_text())["groups"]["run-1/learner"]["strategy"] == "PACK"


@pytest.mark.ray
def test_a_learner_bigger_than_the_cluster_fails_before_any_actor(head: Head, tmp_path: Path) -> None:
    before = len(_actors(head, "LearnerRank"))
    started = time.monotonic()
    shape = ["warp.runs=1", "learners.ranks=4", "learners.num_cpus=1", "model.dtype=auto"]
    result = _submit(head, "warp-big", f"output.dir={tmp_path / 'run'}", *shape, *NODE_ROLES)
    elapsed = time.monotonic() - started
    assert _status(head, "warp-big") == "FAILED" and result.returncode != 0
    logs = _ray(head, "job", "logs", "warp-big", timeout=60).stdout
    assert "cannot hold this run" in logs and "run-1/learner" in logs, logs[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s: the check must run before any actor waits for resources"
    assert len(_actors(head, "LearnerRank")) == before  # no rank was ever started
    assert not (tmp_path / "run" / "iter-1").exists()
    # config.yaml was written before the check: it records the dtype `auto` resolved to, which a resume keeps
    dtype = "bfloat16" if native_bf16_cpu() else "float32"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["dtype"] == dtype


@pytest.mark.ray
def test_a_node_that_does_not_see_the_output_dir_is_named_before_any_actor(head: Head, tmp_path: Path) -> None:
    """A node in its own mount namespace, an empty tmpfs over output.dir's parent: the run's learner would land
    there and write its checkpoints where the driver never sees them. The driver names it and exits 2."""
    masked = Path(tempfile.mkdtemp(prefix="wr-masked-", dir="/tmp"))
    isolated = ("127.0.0.5", 1, {"isolated_node": 1})
    first = len(head.workers)
    try:
        _add_workers(head, head.temp_dir, [isolated], masked=masked)
        before = len(_actors(head, "LearnerRank"))
        shape = ["warp.runs=1", "learners.num_cpus=0.5", "resources.learner_resource=isolated_node"]
        result = _submit(head, "warp-masked", f"output.dir={masked / 'run'}", *shape)
        assert _status(head, "warp-masked") == "FAILED" and result.returncode != 0
        logs = _ray(head, "job", "logs", "warp-masked", timeout=60).stdout
        assert f"node 127.0.0.5 does not see output.dir {str(masked / 'run')!r}" in logs, logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
        assert len(_actors(head, "LearnerRank")) == before  # no rank was ever started
        assert not list((masked / "run").glob(".storage-probe-*"))  # the probe is removed
    finally:
        for process in head.workers[first:]:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
        _kill_node(head, "127.0.0.5")
        shutil.rmtree(masked, ignore_errors=True)
