"""Benchmark: one WARP run's end-to-end step (generate → score → learner step → weight sync) on SmolLM2-135M.

The work per step is the demo's: 8 prompts × 4 samples × at most 16 new tokens, temperature 0.9, top-k 50,
VADER reward, β = 0.05, one learner step (2 micro-batches of 16). Runs `warp-rlhf train` with the demo
config, M = 1, and reads the per-step timings from metrics.parquet; the first steps (warm-up) are left
out. Both the engine and the learner get every core: within a run they alternate, never overlap.

    .venv/bin/python bench/warp_step.py [--steps 8] [--warmup 2] [--cpus 2] [--dtype auto]

This prints WARP's figures only. For the ratio to TRL's RLOOTrainer on the same work, measured in the
same invocation on the same machine, run bench/peer_trl.py (it imports :func:`measure_warp_step`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
PHASES = ("generate_s", "learn_s", "sync_s")


def measure_warp_step(steps: int = 8, warmup: int = 2, cpus: float = 2.0, dtype: str = "auto") -> dict:
    """Medians over the steps after ``warmup`` of a demo run with M = 1 and ``model.dtype = dtype``.

    Returns dtype (as the run resolved it), steps (how many went into the medians), generate_s, learn_s,
    sync_s, step_s (their sum, per step) and completion_tokens_per_s (completion tokens / step_s, per step).
    """
    if steps <= warmup:
        raise ValueError(f"steps = {steps} must exceed warmup = {warmup}: no step would be left to measure")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [
            "warp.runs=1", "warp.iterations=1", f"warp.steps={steps}", f"learners.num_cpus={cpus}",
            f"actors.num_cpus={cpus}", f"model.dtype={dtype}", f"output.dir={out}", "output.save_samples=false",
            "output.tensorboard=false",
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "warp_rlhf", "train", "--config", str(DEMO_CONFIG), *overrides]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-30:])
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}:\n{tail}")
        rows = pq.read_table(out / "metrics.parquet").to_pylist()[warmup:]
        resolved = yaml.safe_load((out / "config.yaml").read_text())["model"]["dtype"]
    step = [sum(r[key] for key in PHASES) for r in rows]
    result: dict = {"dtype": resolved, "steps": len(rows)}
    result |= {key: statistics.median(r[key] for r in rows) for key in PHASES}
    result["step_s"] = statistics.median(step)
    result["completion_tokens_per_s"] = statistics.median(
        r["completion_tokens"] / s for r, s in zip(rows, step, strict=True)
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    parser.add_argument("--cpus", type=float, default=2.0, help="num_cpus of the engine and of the learner")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto", help="model.dtype")
    args = parser.parse_args()
    result = measure_warp_step(args.steps, args.warmup, args.cpus, args.dtype)
    print(f"model.dtype {result['dtype']}, medians of {result['steps']} steps after {args.warmup} warm-up steps")
    for key in PHASES:
        print(f"{key:<10} {result[key]:6.2f} s")
    tokens = result["completion_tokens_per_s"]
    print(f"step       {result['step_s']:6.2f} s   {tokens:.0f} completion tokens/s end to end")
    print("ratio to TRL's RLOOTrainer on the same work: run bench/peer_trl.py")


if __name__ == "__main__":
    main()
