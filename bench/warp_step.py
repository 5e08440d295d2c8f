"""Benchmark: one WARP run's end-to-end step (generate → score → learner step → weight sync) on SmolLM2-135M.

The work per step is the peer measurement in stack-notes.md (TRL's RLOOTrainer: 8 prompts × 4 samples ×
24 new tokens, temperature 0.9, bf16: ≈ 13 s per step, 55–59 completion tokens/s on this 2-core machine).
Runs `warp-rlhf train` with the demo config, M = 1, and reads the per-step timings from metrics.parquet;
the first steps (warm-up) are left out. Both the engine and the learner get every core: within a run
they alternate, never overlap.

    .venv/bin/python bench/warp_step.py [--steps 8] [--cpus 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

TRL_STEP_S = 13.0  # stack-notes.md, same work, same machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    parser.add_argument("--cpus", type=float, default=2.0, help="num_cpus of the engine and of the learner")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [
            "warp.runs=1", "warp.iterations=1", f"warp.steps={args.steps}", f"learners.num_cpus={args.cpus}",
            f"actors.num_cpus={args.cpus}", f"output.dir={out}", "output.save_samples=false",
            "output.tensorboard=false",
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "warp_rlhf", "train", "--config", "configs/demo.yaml", *overrides]
        subprocess.run(cmd, check=True, capture_output=True)
        rows = pq.read_table(out / "metrics.parquet").to_pylist()[args.warmup :]
    step = [r["generate_s"] + r["learn_s"] + r["sync_s"] for r in rows]
    for key in ("generate_s", "learn_s", "sync_s"):
        print(f"{key:<10} {statistics.median(r[key] for r in rows):6.2f} s (median of {len(rows)} steps)")
    median = statistics.median(step)
    tokens = statistics.median(r["completion_tokens"] / s for r, s in zip(rows, step, strict=True))
    print(f"step       {median:6.2f} s   {tokens:.0f} completion tokens/s end to end")
    print(f"vs TRL     {median / TRL_STEP_S:6.2f} of TRL RLOOTrainer's {TRL_STEP_S:.0f} s step (goal: well under 0.5)")


if __name__ == "__main__":
    main()
