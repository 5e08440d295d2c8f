"""The smoke config through the CLI, with real Ray, vLLM and DeepSpeed: how a run stops, contract, merge maths.

The run is the session's `stopped_run` (tests/warp_rlhf/conftest.py): the smoke config with 10 steps per
iteration, stopped two ways and resumed to the end, one after another on one run directory:

1. A learner dies (SIGKILL): the other run stops within a step (fail-fast), the original error surfaces.
2. Ctrl-C once: every run stops at its next step boundary, saves, exits 130 with one line saying how to resume.
3. `--resume` finishes both iterations with every step exactly once, in the run's dtype; a changed
   hyperparameter is refused.

No process of a stopped `train`'s Ray instance may be left once it has exited. Everything else here also
holds for a run that went through a killed learner and a Ctrl-C. It trains in bfloat16 (the demo's dtype
on CPUs that compute it natively): train → merge → eval in bf16, with the runs' final policies saved as
their fp32 master weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.warp_rlhf.conftest import POLICY_EVERY, STEPS, TRAIN_ARGS, StopChain
from warp_rlhf.outputs import RunDir

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def _warp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warp_rlhf", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# --- how the chain stopped ----------------------------------------------------------------------------------------


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


def test_resume_finishes_every_step_once_in_the_runs_dtype(stopped_run: StopChain) -> None:
    out, stage = stopped_run.out, stopped_run.finished
    assert stage.returncode == 0, stage.stderr[-4000:]
    keys = sorted((r["iteration"], r["run"], r["step"]) for r in pq.read_table(out / "metrics.parquet").to_pylist())
    assert keys == [(i, m, t) for i in (1, 2) for m in (1, 2) for t in range(STEPS)]  # nothing twice, none lost
    assert "dtype: bfloat16" in (out / "config.yaml").read_text()
    # merged from the learners' fp32 master weights, θ_init stays fp32 (the engines round it as they load it)
    assert json.loads((out / "iter-2" / "init" / "config.json").read_text())["dtype"] == "float32"


def test_resume_refuses_a_changed_hyperparameter(stopped_run: StopChain) -> None:
    changed = stopped_run.changed
    assert changed.returncode == 2 and "warp.beta (0.1 → 0.5)" in changed.stderr, changed.stderr[-2000:]


# --- the finished run -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(stopped_run: StopChain) -> Path:
    assert stopped_run.finished.returncode == 0, stopped_run.finished.stderr[-4000:]
    return stopped_run.out


def test_resuming_a_finished_run_starts_nothing_and_rewrites_nothing(smoke_run: Path) -> None:
    """`make demo` run again: a complete run says so before Ray, engines or learners start (it took 40 s)."""
    files = {path: path.stat().st_mtime_ns for path in smoke_run.rglob("*") if path.is_file()}
    result = _warp(*TRAIN_ARGS, f"output.dir={smoke_run}", "--resume", timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "is complete (2 of 2 iterations merged): nothing to train" in result.stderr
    assert "Ray" not in result.stderr  # neither a start-up phase nor ray.init's banner
    assert {path: path.stat().st_mtime_ns for path in smoke_run.rglob("*") if path.is_file()} == files


def test_output_contract(smoke_run: Path) -> None:
    import yaml

    config = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert Path(config["model"]["path"]).is_dir()  # the resolved θ_sft directory is recorded
    for i in (1, 2):
        for sub in ("run-1", "run-2", "slerp", "init"):
            ckpt = smoke_run / f"iter-{i}" / sub
            for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
                assert (ckpt / name).is_file(), ckpt / name
    metrics = pq.read_table(smoke_run / "metrics.parquet").to_pylist()
    keys = {(r["iteration"], r["run"], r["step"]) for r in metrics}
    assert keys == {(i, m, t) for i in (1, 2) for m in (1, 2) for t in range(STEPS)}
    for column in ("reward", "kl", "loss", "entropy", "completion_tokens", "generate_s", "learn_s", "sync_s"):
        assert column in metrics[0], column
    # The weight-sync health check: the learner's per-token log-probs against the sampler's, every step.
    assert all(0 <= r["drift_mean"] <= r["drift_max"] < 1.0 for r in metrics)
    samples = pq.read_table(smoke_run / "samples").to_pylist()  # a directory of Parquet parts
    assert len(samples) == 2 * 2 * STEPS * 4 * 2  # iterations × runs × steps × prompts × samples
    assert all(s["reward"] is not None for s in samples)
    assert list((smoke_run / "tensorboard").glob("events.out.tfevents.*"))
    assert not (smoke_run / "state" / "iter-1").exists()  # step state is dropped once merged
    # output.policy_every = 5 of 10 steps: each run's policy after step 5 (after step 10: iter-<i>/run-<m>).
    for i in (1, 2):
        assert [(m, t) for m, t, _ in RunDir(smoke_run).snapshots(i)] == [(1, POLICY_EVERY), (2, POLICY_EVERY)]


def test_every_rollout_is_on_policy(smoke_run: Path) -> None:
    """Step t of iteration i samples with weights version base(i) + t; step 0's KL is 0 (anchor = policy = θ_init)."""
    steps = {1: STEPS, 2: STEPS}
    base = {i: sum(steps[k] for k in range(1, i)) + i - 1 for i in steps}
    samples = pq.read_table(smoke_run / "samples").to_pylist()
    assert {(s["iteration"], s["step"], s["version"]) for s in samples} == {
        (i, t, base[i] + t) for i in steps for t in range(steps[i])
    }
    metrics = pq.read_table(smoke_run / "metrics.parquet").to_pylist()
    first = [r for r in metrics if r["step"] == 0]
    assert len(first) == 4 and all(r["kl"] == pytest.approx(0.0, abs=1e-6) for r in first)
    assert all(r["version"] == base[r["iteration"]] + r["step"] + 1 for r in metrics)  # the version after the step


def test_merge_recomputes_from_saved_checkpoints(smoke_run: Path) -> None:
    import torch
    import yaml

    from merger import liti, load_flat, slerp

    sft = yaml.safe_load((smoke_run / "config.yaml").read_text())["model"]["path"]
    init = load_flat(sft).state_dict()
    policies = [load_flat(smoke_run / "iter-1" / f"run-{m}").state_dict() for m in (1, 2)]
    wide = {name: t.float() for name, t in init.items()}  # bf16 → fp32 is exact
    expected_slerp = slerp(wide, policies, lam=0.5)
    expected_init = liti(wide, expected_slerp, 0.3)
    saved_slerp = load_flat(smoke_run / "iter-1" / "slerp").state_dict()
    saved_init = load_flat(smoke_run / "iter-1" / "init").state_dict()
    assert {t.dtype for t in init.values()} == {torch.bfloat16}
    assert {t.dtype for t in policies[0].values()} == {torch.float32}  # fp32 master weights: unrounded δ_m
    # ... and so are the merge's results: never rounded to the bf16 model's resolution, where most of a LITI
    # update at RL's learning rates is lost.
    assert {t.dtype for t in saved_slerp.values()} == {torch.float32} == {t.dtype for t in saved_init.values()}
    for name in init:
        # Both in fp32; the service forms θ_init in one expression, liti() from θ_slerp: a few fp32 ulps apart.
        torch.testing.assert_close(saved_slerp[name], expected_slerp[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved_init[name], expected_init[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(policies[0][n], wide[n]) for n in init)  # the runs did learn


def test_final_checkpoints_load_in_vllm(smoke_run: Path) -> None:
    """θ_init and a run's final policy (both fp32, as their config.json says) load in vLLM: θ_init in the run's
    bf16, as its engines load it, the policy as saved."""
    assert json.loads((smoke_run / "iter-1" / "run-1" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((smoke_run / "iter-2" / "init" / "config.json").read_text())["dtype"] == "float32"
    code = "from vllm import LLM, SamplingParams\n"
    for sub, dtype in (("iter-2/init", "bfloat16"), ("iter-1/run-1", "float32")):
        code += (
            f"llm = LLM(model={str(smoke_run / sub)!r}, dtype={dtype!r}, enforce_eager=True,"
            " kv_cache_memory_bytes=128 << 20, max_model_len=128)\n"
            "out = llm.generate(['The film'], SamplingParams(max_tokens=5, temperature=0))\n"
            "print(len(out[0].outputs[0].token_ids))\n"
            "llm.llm_engine.engine_core.shutdown()\n"
        )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [line for line in result.stdout.splitlines() if line.strip().isdigit()]  # vLLM logs to stdout too
    assert counts == ["5", "5"], result.stdout[-2000:]


def test_eval_writes_the_pareto_front_sampled_as_overridden(smoke_run: Path) -> None:
    """The run's models, snapshots and LITI family, sampled as `eval.*` overrides say instead of as the run's
    actors did (the run's own settings as the default: tests/warp_rlhf/test_evaluate.py)."""
    result = _warp("eval", "--run", str(smoke_run), "eval.temperature=1.0", "eval.top_k=-1")
    assert result.returncode == 0, result.stderr[-4000:]
    front = pq.read_table(smoke_run / "pareto.parquet").to_pylist()
    assert {(r["temperature"], r["top_k"]) for r in front} == {(1.0, -1)}
    assert "sampled at temperature 1, top-k off" in result.stdout
    labels = [r["model"] for r in front]
    # each run's snapshot, then its final policy
    runs = {i: [f"iter-{i}/run-{m}@{t}" for m in (1, 2) for t in (POLICY_EVERY, STEPS)] for i in (1, 2)}
    assert labels[:13] == ["sft", "iter-1/slerp", "iter-1/init", *runs[1], "iter-2/slerp", "iter-2/init", *runs[2]]
    assert sum(r["kind"] == "liti" for r in front) == 5
    steps = {r["model"]: (r["run"], r["step"]) for r in front if r["kind"] == "policy"}
    assert steps[f"iter-2/run-2@{POLICY_EVERY}"] == (2, POLICY_EVERY) and steps[f"iter-2/run-2@{STEPS}"] == (2, STEPS)
    sft = front[0]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-6)  # θ_sft against itself
    assert (smoke_run / "pareto.png").stat().st_size > 10_000
    assert "iter-2/init" in result.stdout
