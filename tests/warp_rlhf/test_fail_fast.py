"""Fail fast: a failure in one run stops the other within one step, surfaces the original error, and resume finishes.

Run 1's learner rank is SIGKILLed mid-iteration (its pid from placement.json). Without fail-fast, run 2
would train all its steps before the error surfaced; with it, run 2 stops at its next step boundary,
writing a step checkpoint, and `--resume` completes both runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.vllm]
STEPS = 12


def _step(out: Path, run: int) -> int:
    progress = out / "state" / "iter-1" / f"run-{run}" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


def test_a_failing_run_stops_the_other_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", "configs/smoke.yaml", f"output.dir={out}", "warp.iterations=1",
            f"warp.steps={STEPS}", "warp.checkpoint_every=1"]  # fmt: skip
    warp = [sys.executable, "-m", "warp_rlhf"]
    driver = subprocess.Popen([*warp, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while min(_step(out, 1), _step(out, 2)) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None and min(_step(out, 1), _step(out, 2)) >= 2, "the runs never got going"
    (rank,) = json.loads((out / "placement.json").read_text())["runs"][0]["learner_ranks"]
    os.kill(rank["pid"], signal.SIGKILL)  # run 1's learner dies mid-iteration
    at_kill = _step(out, 2)
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode != 0
    assert "ActorDiedError" in stderr or "RayActorError" in stderr, stderr[-3000:]  # the original error
    assert _step(out, 2) <= at_kill + 2 < STEPS  # run 2 stopped within a step, checkpointed where it stood

    resumed = subprocess.run([*warp, *args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "run 2 of iteration 1 resumes at step" in resumed.stderr
    keys = sorted((r["run"], r["step"]) for r in pq.read_table(out / "metrics.parquet").to_pylist())
    assert keys == [(m, t) for m in (1, 2) for t in range(STEPS)]  # nothing twice, nothing lost
    assert (out / "iter-1" / "init" / "model.safetensors").is_file()
