"""The session's one trained smoke run: stopped two ways, then finished by `--resume`; and `train` as a test runs it.

Each `warp-rlhf train` costs half a minute or more of start-up on two cores (Ray, two vLLM engines, two
DeepSpeed learners), so the suite trains the smoke config once and asks two kinds of questions of it
(tests/warp_rlhf/test_end_to_end.py): how the stops behaved (from what :class:`StopChain` observed) and
whether the finished run keeps the output contract, merges exactly and evaluates (from its directory). A
run that went through a killed learner and a Ctrl-C must be as good as one that did not. (Ctrl-C twice, the
hard stop, is the LoRA run's: tests/warp_rlhf/test_lora_runs.py.)

The chain, on one run directory:

1. Run 1's learner rank is SIGKILLed part-way through iteration 1 (its pid from placement.json).
2. `--resume`, then Ctrl-C once.
3. `--resume` to the end; then a resume with a changed hyperparameter, which must be refused.

Each `train` runs in its own session with a marker in its environment, which every process of its Ray
instance (GCS, raylet, workers, the vLLM engines) inherits, so leftovers can be counted once it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import left_over

ROOT = Path(__file__).resolve().parents[2]
MARKER = "WARP_RLHF_TEST_INSTANCE"
STEPS = 10  # per iteration: long enough for each stop to land part-way through iteration 1
POLICY_EVERY = 5  # output.policy_every: one snapshot per run and iteration besides the final policy
TRAIN_ARGS = ["train", "--config", "configs/smoke.yaml", f"warp.steps={STEPS}", "warp.checkpoint_every=1",
              f"output.policy_every={POLICY_EVERY}", "model.dtype=bfloat16"]  # fmt: skip


def checkpointed_step(out: Path, run: int) -> int:
    """The step run ``run`` of iteration 1 has checkpointed (0 before its first checkpoint, and once merged)."""
    progress = out / "state" / "iter-1" / f"run-{run}" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


class Train:
    """One `warp-rlhf train` in its own session, its Ray instance marked; killed whole if the session fails."""

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
            if all(checkpointed_step(out, m) >= s for m, s in steps.items()):
                return
            time.sleep(0.2)
        raise AssertionError(f"training never reached steps {steps}: exit {self.process.poll()}")

    def finish(self, timeout: float) -> Stage:
        """How it ended; if it has not within ``timeout``, it is killed and the chain fails with what it
        printed last (a hang must say where it hung)."""
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            _, stderr = self.process.communicate()
            message = f"train still running after {timeout:.0f} s; its stderr ends:\n{stderr[-4000:]}"
            raise AssertionError(message) from None
        return Stage(self.process.returncode, stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Stage:
    """One `train` of the chain: its exit code and stderr, and what the test saw around it."""

    returncode: int
    stderr: str
    left_over: dict[int, str] = field(default_factory=dict)  # processes of its Ray instance alive after it
    steps: dict[str, int] = field(default_factory=dict)  # checkpointed steps at named moments


@dataclass
class StopChain:
    out: Path
    killed: Stage  # 1. a learner SIGKILLed
    interrupted: Stage  # 2. Ctrl-C once
    finished: Stage  # 3. --resume to the end
    changed: subprocess.CompletedProcess  # --resume with warp.beta changed


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> StopChain:
    out = tmp_path_factory.mktemp("stops") / "run"
    args = [*TRAIN_ARGS, f"output.dir={out}"]
    started: list[Train] = []

    def train(*extra: str) -> Train:
        started.append(Train([*args, *extra]))
        return started[-1]

    try:
        # 1. Without fail-fast, run 2 would train all its steps before the error surfaced.
        first = train()
        first.wait_for(out, {1: 2, 2: 2})
        (rank,) = json.loads((out / "placement.json").read_text())["runs"][0]["learner_ranks"]
        os.kill(rank["pid"], signal.SIGKILL)
        at_kill = checkpointed_step(out, 2)
        killed = first.finish(timeout=300)
        killed.steps = {"run 2 at the kill": at_kill, "run 2 after": checkpointed_step(out, 2)}
        killed.left_over = left_over(first.marker)

        second = train("--resume")
        second.wait_for(out, {1: checkpointed_step(out, 1) + 1})
        second.process.send_signal(signal.SIGINT)
        interrupted = second.finish(timeout=180)
        interrupted.steps = {"run 1 after": checkpointed_step(out, 1)}
        interrupted.left_over = left_over(second.marker)

        finished = train("--resume").finish(timeout=600)
    finally:
        for run in started:
            run.kill()
    changed = subprocess.run([sys.executable, "-m", "warp_rlhf", *args, "--resume", "warp.beta=0.5"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    return StopChain(out, killed, interrupted, finished, changed)
