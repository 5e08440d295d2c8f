"""Benchmark: M = 2 LoRA runs on one shared vLLM engine against M = 2 full fine-tuning runs on an engine each.

Both arms run `warp-rlhf train` on the demo's work (SmolLM2-135M, 8 prompts × 4 samples × ≤ 24 new tokens
per step, VADER reward) for one iteration of ``--steps`` steps, in this invocation, one after the other:

- ``full``: learners.lora.rank = 0, one engine per run; every step syncs the whole model to its engine.
- ``lora``: learners.lora.rank = ``--rank`` on every linear layer, actors.share_engines = true: one engine
  with a LoRA slot per run; every step syncs the run's adapter alone.

Printed per arm: medians over the steps after ``--warmup`` of a run's step (generate, learn, sync) and of
the bytes and seconds one sync moved, the time to the first step, the training phase's wall time (first
step start to last step end, both runs), and the engines' peak resident memory (summed over the arm's
engine processes, sampled every 0.5 s from /proc while training).

Then, in the same invocation, what LoRA costs vLLM itself: one engine generating the same 32 prompts × 24
tokens (ignore_eos) without LoRA, with LoRA slots but no adapter, and with a rank-``--rank`` adapter on every
linear layer (medians of 2 calls after a warm-up call).

    .venv/bin/python -m bench.lora [--steps 6] [--warmup 2] [--rank 16] [--dtype auto] [--only arms|vllm]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
PHASES = ("generate_s", "learn_s", "sync_s")


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class EngineMemory(threading.Thread):
    """Peak summed RSS of the engine processes named in ``<out>/placement.json``, polled until stopped."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out, self.peak, self.engines = out, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        pids: set[int] = set()
        while not self.done.wait(0.5):
            placement = self.out / "placement.json"
            if not pids and placement.is_file():
                runs = json.loads(placement.read_text())["runs"]
                pids = {engine["pid"] for run in runs for engine in run["engines"]}
                self.engines = len(pids)
            if pids:
                self.peak = max(self.peak, sum(_rss_bytes(pid) for pid in pids))


def measure(arm: str, steps: int, warmup: int, rank: int, dtype: str) -> dict:
    lora = [f"learners.lora.rank={rank}", f"learners.lora.alpha={2 * rank}", "actors.share_engines=true",
            "learners.lr=3e-4"] if arm == "lora" else []  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = ["warp.runs=2", "warp.iterations=1", f"warp.steps={steps}", f"warp.checkpoint_every={steps}",
                     f"model.dtype={dtype}", f"output.dir={out}", "output.save_samples=false",
                     "output.tensorboard=false", *lora]  # fmt: skip
        cmd = [sys.executable, "-m", "warp_rlhf", "train", "--config", str(DEMO_CONFIG), *overrides]
        memory = EngineMemory(out)
        memory.start()
        began = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - began
        memory.done.set()
        memory.join()
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-30:])
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}:\n{tail}")
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
        startup = json.loads((out / "startup.json").read_text())
        resolved = yaml.safe_load((out / "config.yaml").read_text())["model"]["dtype"]
    kept = [r for r in rows if r["step"] >= warmup]
    result = {"arm": arm, "dtype": resolved, "steps": len(kept), "engines": memory.engines, "wall_s": wall}
    result |= {key: statistics.median(r[key] for r in kept) for key in PHASES}
    result["step_s"] = statistics.median(sum(r[key] for key in PHASES) for r in kept)
    result["sync_bytes"] = statistics.median(r["sync_bytes"] for r in kept)
    result["first_step_s"] = startup.get("first_step_s")
    result["engine_rss_gib"] = memory.peak / (1 << 30)
    return result


def vllm_lora_overhead(rank: int, dtype: str) -> dict[str, float]:
    """Seconds per generate call of 32 prompts × 24 tokens: no LoRA, LoRA slots only, a rank-``rank`` adapter."""
    import gc
    import os

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from actors.adapter import AdapterWeights, save_adapter, vllm_max_rank
    from merger.checkpoint import Checkpoint
    from merger.flat import flatten
    from warp_rlhf.config import load_config
    from warp_rlhf.hardware import resolve_dtype
    from warp_rlhf.models import resolve_model

    if dtype == "auto":
        dtype = resolve_dtype(load_config(DEMO_CONFIG))[0].model.dtype
    base = str(resolve_model("smollm2-135m", dtype))
    with Checkpoint(base) as checkpoint:
        shapes = {n: s for n, (_, s) in checkpoint.layout.items() if n.endswith("proj.weight")}
    generator = torch.Generator().manual_seed(0)
    factors = []
    for name, (rows, columns) in shapes.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        factors += [(f"{prefix}.lora_A.weight", torch.randn(rank, columns, generator=generator) * 0.01),
                    (f"{prefix}.lora_B.weight", torch.randn(rows, rank, generator=generator) * 0.01)]  # fmt: skip
    targets = tuple(sorted({n.split(".")[-2] for n in shapes}))
    prompts = [f"The movie number {i} was" for i in range(32)]
    params = SamplingParams(temperature=0.9, top_k=50, max_tokens=24, seed=0, ignore_eos=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(AdapterWeights(flatten(factors), rank, 2.0 * rank, targets), Path(tmp) / "a", base)
        for slots in (False, True):
            lora = dict(enable_lora=True, max_loras=2, max_lora_rank=vllm_max_rank(rank)) if slots else {}
            llm = LLM(model=base, dtype=dtype, enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=1 << 29,
                      seed=0, **lora)  # fmt: skip
            cases = {"lora slots, adapter": LoRARequest("a", 1, str(adapter)), "lora slots, no adapter": None}
            for label, request in cases.items() if slots else {"no lora": None}.items():
                llm.generate(prompts[:4], params, lora_request=request, use_tqdm=False)
                times = []
                for _ in range(2):
                    began = time.perf_counter()
                    llm.generate(prompts, params, lora_request=request, use_tqdm=False)
                    times.append(time.perf_counter() - began)
                seconds[label] = statistics.median(times)
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--only", choices=("arms", "vllm"), help="run one part only")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    print(f"CPU: {cpu_model()}", flush=True)
    if args.only != "vllm":
        arms(args)
    if args.only != "arms":
        seconds = vllm_lora_overhead(args.rank, args.dtype)
        plain = seconds["no lora"]
        print("one vLLM engine, 32 prompts × 24 tokens: " + ", ".join(
            f"{label} {s:.2f} s ({s / plain:.2f}×)" for label, s in seconds.items()))  # fmt: skip


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def arms(args: argparse.Namespace) -> None:
    print(f"{args.steps} steps per run, first {args.warmup} left out; M = 2 runs", flush=True)
    results = [measure(arm, args.steps, args.warmup, args.rank, args.dtype) for arm in ("full", "lora")]
    header = ("arm", "dtype", "engines", "step_s", "generate_s", "learn_s", "sync_s", "sync MiB", "engine GiB",
              "1st step s", "wall s")  # fmt: skip
    print(" ".join(f"{h:>10}" for h in header))
    for r in results:
        first = r["first_step_s"] or float("nan")
        cells = (r["arm"], r["dtype"], r["engines"], f"{r['step_s']:.2f}", f"{r['generate_s']:.2f}",
                 f"{r['learn_s']:.2f}", f"{r['sync_s']:.3f}", f"{r['sync_bytes'] / (1 << 20):.2f}",
                 f"{r['engine_rss_gib']:.2f}", f"{first:.0f}", f"{r['wall_s']:.0f}")  # fmt: skip
        print(" ".join(f"{c:>10}" for c in cells))
    full, lora = results
    print(f"lora / full: step {lora['step_s'] / full['step_s']:.2f}×, sync bytes "
          f"{lora['sync_bytes'] / full['sync_bytes']:.4f}×, sync time {lora['sync_s'] / full['sync_s']:.2f}×, "
          f"engine memory {lora['engine_rss_gib'] / full['engine_rss_gib']:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
