"""Cluster runs: cluster.yaml against Ray's own schema, and `ray job submit` of the smoke config to a real head.

The head node is this test's own (`ray start --head --block` on its own ports and temp directory, a random
auth token) and is stopped through that one process: never `ray stop`, which would kill every Ray process on
the machine, including other test sessions'.
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
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

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


def test_cluster_yaml_holds_the_gpu_preset() -> None:
    from warp_rlhf.cluster import required_resources
    from warp_rlhf.config import load_config

    config = _cluster_yaml()
    have = {"CPU": 0, "GPU": 0}
    for name, node in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node["min_workers"]
        assert name == config["head_node_type"] or node["min_workers"] == node["max_workers"]  # all up at start
        for key in have:
            have[key] += count * node["resources"].get(key, 0)
    need = required_resources(load_config(ROOT / "configs" / "gpu-7b.yaml", []))
    assert need["CPU"] <= have["CPU"] and need["GPU"] <= have["GPU"], (need, have)
    assert config["available_node_types"][config["head_node_type"]]["resources"]["GPU"] == 0


# --- a real head node and `ray job submit` -------------------------------------------------------------------


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: Path
    dashboard: str  # http://127.0.0.1:<port>
    gcs_port: int
    env: dict[str, str]  # what `ray` clients need: this environment first on PATH, the token


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _processes_with(marker: str) -> list[int]:
    """Every process whose environment holds `marker` (our head's token): the head and all it spawned."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue  # exited, or not ours to read
    return [pid for pid in found if pid != os.getpid()]


def _start_head(temp_dir: Path, log: Path) -> Head:
    gcs, dashboard, client, agent = _free_ports(4)
    token = secrets.token_hex(32)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1"]
    cmd += ["--dashboard-port", str(dashboard), "--ray-client-server-port", str(client)]
    cmd += ["--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp_dir), "--num-cpus", "4"]
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


def _stop_head(head: Head) -> None:
    """SIGTERM `ray start --block` alone (it drains and stops its daemons), then SIGKILL any straggler."""
    marker = f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}"
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.process.wait(timeout=90)
    for _ in range(3):  # workers may be mid-spawn; kill only processes carrying this head's token
        leftovers = _processes_with(marker)
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
        yield head
    finally:
        _stop_head(head)
        assert _processes_with(f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}") == []
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, job_id: str, *overrides: str) -> subprocess.CompletedProcess:
    """`ray job submit` as the README gives it, waiting for the end (the CLI tails the job's logs)."""
    train = ["python", "-m", "warp_rlhf", "train", "--config", "configs/smoke.yaml", *overrides]
    args = ["job", "submit", "--submission-id", job_id, "--working-dir", "."]
    return _ray(head, *args, "--", *train, timeout=JOB_TIMEOUT_S)


def _status(head: Head, job_id: str) -> str:
    """The job's state from the job REST API (what `ray job status` prints, without the prose)."""
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


@pytest.mark.ray
@pytest.mark.vllm
def test_job_submit_trains_smoke_config(head: Head, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _submit(head, "warp-smoke", f"output.dir={out}")
    assert _status(head, "warp-smoke") == "SUCCEEDED", result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0
    for i in (1, 2):
        for sub in ("run-1", "run-2", "slerp", "init"):
            assert (out / f"iter-{i}" / sub / "model.safetensors").is_file(), f"iter-{i}/{sub}"
    assert (out / "metrics.parquet").is_file() and (out / "config.yaml").is_file()
    # The working directory went up without what .gitignore names (the virtualenv, caches, runs).
    unpacked = head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    (package,) = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]  # beside it: the downloaded zip
    shipped = {p.name for p in package.iterdir()}
    assert {"warp_rlhf", "actors", "learners", "merger", "configs"} <= shipped
    assert not shipped & {".venv", ".cache", "runs", ".git"}, shipped


@pytest.mark.ray
def test_too_small_cluster_fails_fast_naming_what_is_missing(head: Head, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _submit(head, "warp-gpus", "actors.num_gpus=1", f"output.dir={tmp_path / 'run'}")
    elapsed = time.monotonic() - started
    assert _status(head, "warp-gpus") == "FAILED" and result.returncode != 0
    logs = _ray(head, "job", "logs", "warp-gpus", timeout=60).stdout
    assert "too small for this config" in logs and "2 GPUs (cluster has 0)" in logs, logs[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s: the check must run before any actor waits for resources"
    assert not (tmp_path / "run" / "iter-1").exists()
