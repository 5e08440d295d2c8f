"""Every way a real `warp-rlhf train` stops early, one after another on one run directory, then `--resume` finishes.

1. A learner dies (SIGKILL): the other run stops within a step (fail-fast), the original error surfaces.
2. Ctrl-C once: every run stops at its next step boundary, saves, exits 130 with one line saying how to resume.
3. Ctrl-C twice: the second one quits at once (a hard stop: whatever the last step checkpoint holds is the state).
4. `--resume` finishes both iterations with every step exactly once, in the dtype `auto` chose at the start;
   a changed hyperparameter is refused.

Each `train` runs in its own session with a marker in its environment, which every process of its Ray
instance (GCS, raylet, workers, the vLLM engines) inherits: none may be left once `train` has exited.
One chain instead of a test per stop: each `train` costs a minute of start-up on two cores.
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

from tests.processes import left_over
from warp_rlhf.hardware import native_bf16_cpu

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.vllm]
STEPS = 10
MARKER = "WARP_RLHF_TEST_INSTANCE"


def _step(out: Path, run: int) -> int:
    progress = out / "state" / "iter-1" / f"run-{run}" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


class Train:
    """One `warp-rlhf train` in its own session, its Ray instance marked; killed whole if the test fails."""

    def __init__(self, args: list[str]) -> None:
        self.marker = uuid.uuid4().hex
        env = {**os.environ, MARKER: self.marker}
        self.process = subprocess.Popen([sys.executable, "-m", "warp_rlhf", *args], cwd=ROOT, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)  # fmt: skip

    def wait_for(self, out: Path, steps: dict[int, int]) -> None:
        """Until run m has checkpointed step ``steps[m]`` (for every m given)."""
        deadline = time.monotonic() + 480
        while self.process.poll() is None and time.monotonic() < deadline:
            if all(_step(out, m) >= s for m, s in steps.items()):
                return
            time.sleep(0.2)
        raise AssertionError(f"training never reached steps {steps}: exit {self.process.poll()}")

    def finish(self, timeout: float) -> str:
        """Its stderr once it has exited; if it has not within ``timeout``, it is killed and the test fails
        with what it printed last (a hang must say where it hung)."""
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            _, stderr = self.process.communicate()
            message = f"train still running after {timeout:.0f} s; its stderr ends:\n{stderr[-4000:]}"
            raise AssertionError(message) from None
        return stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def train():
    started: list[Train] = []

    def train(args: list[str]) -> Train:
        started.append(Train(args))
        return started[-1]

    yield train
    for run in started:
        run.kill()


def test_a_run_survives_every_kind_of_stop_and_resume_finishes_it(tmp_path: Path, train) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", "configs/smoke.yaml", f"output.dir={out}", f"warp.steps={STEPS}",
            "warp.checkpoint_every=1", "model.dtype=auto"]  # fmt: skip

    # 1. Run 1's learner rank is SIGKILLed mid-iteration (its pid from placement.json). Without fail-fast,
    #    run 2 would train all its steps before the error surfaced.
    first = train(args)
    first.wait_for(out, {1: 2, 2: 2})
    (rank,) = json.loads((out / "placement.json").read_text())["runs"][0]["learner_ranks"]
    os.kill(rank["pid"], signal.SIGKILL)
    at_kill = _step(out, 2)
    stderr = first.finish(timeout=300)
    assert first.process.returncode not in (0, 130)
    assert "ActorDiedError" in stderr or "RayActorError" in stderr, stderr[-3000:]  # the original error
    assert _step(out, 2) <= at_kill + 2 < STEPS  # run 2 stopped within a step, checkpointed where it stood
    assert not left_over(first.marker)

    # 2. Resume, then Ctrl-C: every run stops at its next step boundary, saves, shuts Ray down, exits 130.
    second = train([*args, "--resume"])
    second.wait_for(out, {1: _step(out, 1) + 1})
    second.process.send_signal(signal.SIGINT)
    stderr = second.finish(timeout=180)
    assert second.process.returncode == 130, stderr[-3000:]
    assert "run 2 of iteration 1 resumes at step" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("warp-rlhf: stopped by SIGINT; state saved in"), last
    assert "continue with: warp-rlhf train --config configs/smoke.yaml --resume" in last
    assert not left_over(second.marker)
    assert _step(out, 1) < STEPS

    # 3. Resume, then Ctrl-C twice: the second quits at once, without a traceback and without leftovers.
    third = train([*args, "--resume"])
    third.wait_for(out, {1: _step(out, 1) + 1})
    third.process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    third.process.send_signal(signal.SIGINT)
    stderr = third.finish(timeout=30)
    assert third.process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGINT again: quitting now" in stderr, stderr[-3000:]
    assert not left_over(third.marker, grace_s=30)

    # 4. Resume finishes both iterations: every step once, in the dtype `auto` chose when the run began.
    done = train([*args, "--resume"])
    stderr = done.finish(timeout=600)
    assert done.process.returncode == 0, stderr[-4000:]
    keys = sorted((r["iteration"], r["run"], r["step"]) for r in pq.read_table(out / "metrics.parquet").to_pylist())
    assert keys == [(i, m, t) for i in (1, 2) for m in (1, 2) for t in range(STEPS)]  # nothing twice, none lost
    dtype = "bfloat16" if native_bf16_cpu() else "float32"
    assert f"dtype: {dtype}" in (out / "config.yaml").read_text()
    assert json.loads((out / "iter-2" / "init" / "config.json").read_text())["dtype"] == dtype

    changed = subprocess.run([sys.executable, "-m", "warp_rlhf", *args, "--resume", "warp.beta=0.5"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert changed.returncode == 2 and "warp.beta (0.1 → 0.5)" in changed.stderr, changed.stderr[-2000:]
