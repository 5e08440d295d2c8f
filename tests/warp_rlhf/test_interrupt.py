"""Ctrl-C: a real `warp-rlhf train` stops on the first SIGINT, quits on the second, and `--resume` finishes.

Every process of the run's own Ray instance (GCS, raylet, workers, the vLLM engines' processes) inherits
a marker in its environment; none may be left once `train` has exited.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from warp_rlhf.hardware import native_bf16_cpu

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.vllm]
STEPS = 8
MARKER = "WARP_RLHF_TEST_INSTANCE"


def _step(out: Path) -> int:
    progress = out / "state" / "iter-1" / "run-1" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


def _processes_with(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
                found.append(f"{proc.name}: {command}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _no_process_left(marker: str, grace_s: float = 15.0) -> list[str]:
    deadline = time.monotonic() + grace_s
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def start():
    """Start `warp-rlhf` in its own session; whatever is left of it when the test ends (failed) is killed."""
    drivers: list[subprocess.Popen] = []

    def start(args: list[str], marker: str) -> subprocess.Popen:
        env = {**os.environ, MARKER: marker}
        command = [sys.executable, "-m", "warp_rlhf", *args]
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)  # fmt: skip
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def _wait_for_step(driver: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + 480
    while _step(out) < step and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None and _step(out) >= step, f"training never reached step {step}"


def test_ctrl_c_stops_cleanly_then_quits_at_once_and_resume_finishes(tmp_path: Path, start) -> None:
    out = tmp_path / "run"
    overrides = [f"output.dir={out}", "warp.iterations=1", f"warp.steps={STEPS}", "warp.checkpoint_every=1",
                 "model.dtype=auto"]  # fmt: skip
    args = ["train", "--config", "configs/smoke.yaml", *overrides]

    # First SIGINT: every run stops at its next step boundary, saves, shuts Ray down, exits 130.
    first = uuid.uuid4().hex
    driver = start(args, first)
    _wait_for_step(driver, out, 1)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=180)
    assert driver.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("warp-rlhf: stopped by SIGINT; state saved in"), last
    assert "continue with: warp-rlhf train --config configs/smoke.yaml --resume" in last
    assert not _no_process_left(first)
    stopped_at = _step(out)
    assert 1 <= stopped_at < STEPS

    # Resume, then SIGINT twice: the second exits at once, without a traceback and without leftovers.
    second = uuid.uuid4().hex
    driver = start([*args, "--resume"], second)
    _wait_for_step(driver, out, stopped_at + 1)
    driver.send_signal(signal.SIGINT)
    time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=30)
    assert driver.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGINT again: quitting now" in stderr, stderr[-3000:]
    assert not _no_process_left(second, grace_s=30)

    # Resume finishes: every step once, in the dtype `auto` chose when the run began.
    done = subprocess.run([sys.executable, "-m", "warp_rlhf", *args, "--resume"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    keys = sorted((r["run"], r["step"]) for r in pq.read_table(out / "metrics.parquet").to_pylist())
    assert keys == [(m, t) for m in (1, 2) for t in range(STEPS)]
    dtype = "bfloat16" if native_bf16_cpu() else "float32"
    assert f"dtype: {dtype}" in (out / "config.yaml").read_text()
    assert json.loads((out / "iter-1" / "init" / "config.json").read_text())["dtype"] == dtype
