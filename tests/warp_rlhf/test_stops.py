"""Every way a real `warp-rlhf train` stops early, one after another on one run directory, then `--resume`
finishes it: the chain is the session's `stopped_run` (tests/warp_rlhf/conftest.py), which the end-to-end
tests then check as a finished run.

1. A learner dies (SIGKILL): the other run stops within a step (fail-fast), the original error surfaces.
2. Ctrl-C once: every run stops at its next step boundary, saves, exits 130 with one line saying how to resume.
3. Ctrl-C twice: the second one quits at once (a hard stop: whatever the last step checkpoint holds is the state).
4. `--resume` finishes both iterations with every step exactly once, in the run's dtype; a changed
   hyperparameter is refused.

No process of a stopped `train`'s Ray instance may be left once it has exited.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.warp_rlhf.conftest import STEPS, StopChain

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_a_dead_learner_stops_every_run_within_a_step_with_the_original_error(stopped_run: StopChain) -> None:
    killed = stopped_run.killed
    assert killed.returncode not in (0, 130)
    assert "ActorDiedError" in killed.stderr or "RayActorError" in killed.stderr, killed.stderr[-3000:]
    # run 2 stopped within a step of run 1's learner dying, and checkpointed where it stood
    assert killed.steps["run 2 after"] <= killed.steps["run 2 at the kill"] + 2 < STEPS
    assert not killed.left_over


def test_ctrl_c_stops_every_run_at_a_step_boundary_and_says_how_to_resume(stopped_run: StopChain) -> None:
    stage = stopped_run.interrupted
    assert stage.returncode == 130, stage.stderr[-3000:]
    assert "run 2 of iteration 1 resumes at step" in stage.stderr  # this train was itself a resume
    assert "Traceback" not in stage.stderr, stage.stderr[-3000:]
    last = stage.stderr.strip().splitlines()[-1]
    assert last.startswith("warp-rlhf: stopped by SIGINT; state saved in"), last
    assert "continue with: warp-rlhf train --config configs/smoke.yaml --resume" in last
    assert not stage.left_over
    assert stage.steps["run 1 after"] < STEPS


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(stopped_run: StopChain) -> None:
    stage = stopped_run.quit
    assert stage.returncode == 130, stage.stderr[-3000:]
    assert "Traceback" not in stage.stderr and "SIGINT again: quitting now" in stage.stderr, stage.stderr[-3000:]
    assert not stage.left_over


def test_resume_finishes_every_step_once_in_the_runs_dtype(stopped_run: StopChain) -> None:
    out, stage = stopped_run.out, stopped_run.finished
    assert stage.returncode == 0, stage.stderr[-4000:]
    keys = sorted((r["iteration"], r["run"], r["step"]) for r in pq.read_table(out / "metrics.parquet").to_pylist())
    assert keys == [(i, m, t) for i in (1, 2) for m in (1, 2) for t in range(STEPS)]  # nothing twice, none lost
    assert "dtype: bfloat16" in (out / "config.yaml").read_text()
    assert json.loads((out / "iter-2" / "init" / "config.json").read_text())["dtype"] == "bfloat16"


def test_resume_refuses_a_changed_hyperparameter(stopped_run: StopChain) -> None:
    changed = stopped_run.changed
    assert changed.returncode == 2 and "warp.beta (0.1 → 0.5)" in changed.stderr, changed.stderr[-2000:]
