"""Benchmark: the streaming SLERP + LITI merge of M = 2 SmolLM2-135M policies against its I/O floor.

The floor is measured in the same run, with the merger's own reader and writer: read every input
tensor once (θ_init and the M policies) and write one output of the same size. The policies are
θ_sft plus Gaussian noise (σ = 1e-3 × each tensor's std), saved to a temporary directory. Goal:
merge time ≤ 2 × floor. Page cache is warmed first; each figure is the median of ``--repeats``.

    .venv/bin/python bench/merge.py [--model smollm2-135m] [--repeats 3] [--eta 0.3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from merger.checkpoint import Checkpoint, CheckpointWriter
from merger.streaming import merge_checkpoints
from warp_rlhf.models import resolve_model


def make_policy(sft_dir: Path, out: Path, seed: int, sigma: float = 1e-3) -> Path:
    """θ_sft + N(0, (σ·std)²) per tensor, written tensor by tensor."""
    generator = torch.Generator().manual_seed(seed)
    with Checkpoint(sft_dir) as sft, CheckpointWriter(out, sft.layout, sft_dir) as writer:
        for name in sft.entries:
            t = sft.tensor(name)
            t32 = t.to(torch.float32)
            noise = torch.randn(t.shape, generator=generator) * (sigma * float(t32.std()) if t.numel() > 1 else sigma)
            writer.write(name, (t32 + noise).to(t.dtype))
    return out


def floor(init_dir: Path, policy_dirs: list[Path], out: Path) -> None:
    """Read every input tensor once, write one output of the same size: what any streaming merge must do.

    Reads go into one reused buffer per input, as the merge's do, so the floor pays no allocation.
    """
    checkpoints = [Checkpoint(d) for d in (init_dir, *policy_dirs)]
    largest = max(e.nbytes for e in checkpoints[0].entries.values())
    buffers = [torch.empty(largest, dtype=torch.uint8) for _ in checkpoints]
    with CheckpointWriter(out, checkpoints[0].layout, init_dir) as writer:
        for name in checkpoints[0].entries:
            tensors = [c.tensor(name, buffer) for c, buffer in zip(checkpoints, buffers, strict=True)]
            writer.write(name, tensors[0])
    for checkpoint in checkpoints:
        checkpoint.close()


def median_seconds(run: Callable[[], None], out: Path, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU (all threads, user + system) seconds of ``run``."""
    wall, cpu = [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    shutil.rmtree(out, ignore_errors=True)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="θ_sft: alias or HF directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eta", type=float, default=0.3)
    parser.add_argument("--granularity", choices=("tensor", "global"), default="tensor")
    args = parser.parse_args()

    sft_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="warp-bench-merge-") as tmp_name:
        tmp = Path(tmp_name)
        policies = [make_policy(sft_dir, tmp / f"policy-{m}", seed=m) for m in (1, 2)]
        out = tmp / "out"
        size_mb = Checkpoint(sft_dir).nbytes / 1e6
        floor(sft_dir, policies, out)  # warm the page cache for both measurements
        shutil.rmtree(out)
        floor_s, floor_cpu = median_seconds(lambda: floor(sft_dir, policies, out), out, args.repeats)
        merge_s, merge_cpu = median_seconds(
            lambda: merge_checkpoints(sft_dir, policies, out, eta=args.eta, granularity=args.granularity),
            out,
            args.repeats,
        )
    load = os.getloadavg()[0]
    print(f"model   {args.model}: {size_mb:.0f} MB per checkpoint, M = 2; {os.cpu_count()} cores, load {load:.1f}")
    print(f"floor   {floor_s:.3f} s wall, {floor_cpu:.3f} s CPU  (read 3 × {size_mb:.0f} MB, write {size_mb:.0f} MB)")
    print(f"merge   {merge_s:.3f} s wall, {merge_cpu:.3f} s CPU  (SLERP per {args.granularity}, LITI η = {args.eta})")
    print(f"ratio   {merge_s / floor_s:.2f} wall, {merge_cpu / floor_cpu:.2f} CPU  (goal ≤ 2)")


if __name__ == "__main__":
    main()
