"""Benchmark: the merger's peak memory merging M = 2 policies of a large random Llama, against `plan`'s estimate.

Writes θ_init (a random Llama of about ``--params`` parameters, fp32, tensor by tensor: never whole in memory) and M
policies θ_init + noise into a scratch directory, then merges them twice, each in a fresh process, and prints that
process's resident set before and at the peak of the merge, by kind (private, file, shared memory):
- ``streamed``: what a run's merger does now: θ_init and the policies read from their directories, θ_slerp and
  θ_init written to disk tensor by tensor, nothing held whole (``Merger.merge_to_disk``);
- ``returned``: what it did before: θ_init from the object store, the merged θ_init returned whole for the object
  store (``Merger.merge`` with ``keep``), the policies already streamed from directories.
Then `warp-rlhf plan`'s estimate for the merger (``merger_estimate``): the figures the README quotes, and what
tests/merger/test_memory.py checks at a small size.

    .venv/bin/python bench/merger_memory.py --params 1.2e9 [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def llama_config(params: float) -> dict:
    """A Llama shape of about ``params`` parameters: hidden h, 16·h/6 MLP width rounded, vocab 32000, h/128 heads."""
    vocab, ratio = 32_000, 8 / 3
    for hidden in range(256, 16_384, 128):
        layers = max(2, round(hidden / 128))
        intermediate = int(math.ceil(ratio * hidden / 128) * 128)
        total = vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden
        if total >= params:
            break
    heads = hidden // 64
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "torch_dtype": "float32"}  # fmt: skip


def write_models(root: Path, params: float, runs: int) -> tuple[Path, list[Path]]:
    import torch

    from merger.checkpoint import CheckpointWriter

    config = llama_config(params)
    init = root / "init"
    init.mkdir(parents=True)
    (init / "config.json").write_text(json.dumps(config))
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    layout = {"model.embed_tokens.weight": ("float32", (config["vocab_size"], h))}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layout[f"{p}self_attn.{name}.weight"] = ("float32", (h, h))
        layout[f"{p}mlp.gate_proj.weight"] = ("float32", (f, h))
        layout[f"{p}mlp.up_proj.weight"] = ("float32", (f, h))
        layout[f"{p}mlp.down_proj.weight"] = ("float32", (h, f))
        layout[f"{p}input_layernorm.weight"] = ("float32", (h,))
        layout[f"{p}post_attention_layernorm.weight"] = ("float32", (h,))
    layout["model.norm.weight"] = ("float32", (h,))
    outputs = [root / "sft", *(root / f"policy-{m}" for m in range(1, runs + 1))]
    writers = [CheckpointWriter(out, layout, init) for out in outputs]
    for writer in writers:
        writer.__enter__()
    generator = torch.Generator().manual_seed(0)
    for name, (_, shape) in layout.items():
        base = torch.randn(shape, generator=generator) * 0.02
        writers[0].write(name, base)
        for writer in writers[1:]:
            writer.write(name, base + torch.randn(shape, generator=generator) * 2e-4)
        del base
    for writer in writers:
        writer.__exit__(None, None, None)
    return outputs[0], outputs[1:]


CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
from merger.service import Merger
from warp_rlhf.config import config_from_dict

init, out, mode, *policies = sys.argv[1:]
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
cfg = config_from_dict({"warp": {"runs": len(policies)}, "output": {"dir": out}})
source = init
if mode == "returned":  # as before: θ_init arrives from the object store (zero-copy pages of its shared memory)
    import ray
    from merger.checkpoint import load_flat
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=int(Path(init, "..", "bytes").read_text()))
    ref = ray.remote(load_flat).remote(init)  # put by a worker: this process never holds a private copy
    source = ray.get(ref)
peaks = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
done = threading.Event()
def sample():  # the resident set by kind, at its largest during the merge (ru_maxrss has the total only)
    while not done.is_set():
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        time.sleep(0.01)
before = rss()
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
merger = Merger(cfg, init)
if mode == "returned":
    merger.merge(1, source, policies, keep=True)
else:
    merger.merge_to_disk(1, source, policies)
seconds = time.perf_counter() - start
done.set()
print(json.dumps({"rss_before": before, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peaks_by_kind": peaks, "seconds": seconds}))
"""


def measure(init: Path, policies: list[Path], out: Path, mode: str) -> dict:
    from merger.checkpoint import Checkpoint

    with Checkpoint(init) as checkpoint:
        model_bytes = checkpoint.nbytes
    (init.parent / "bytes").write_text(str(int(model_bytes * 1.3) + (256 << 20)))
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", CHILD, str(init), str(out), mode, *map(str, policies)], cwd=ROOT,
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"merge ({mode}) failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures | {"model_bytes": model_bytes}


def estimate(init: Path, runs: int) -> dict:
    from warp_rlhf.config import config_from_dict
    from warp_rlhf.model_size import read_model_shape
    from warp_rlhf.plan import merger_estimate

    shape = read_model_shape(init)
    merger = merger_estimate(config_from_dict({"warp": {"runs": runs}}), shape)
    return {"params": shape.params, "estimate_gib": dict(merger.host)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1.2e9)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=("streamed", "returned"), default=["streamed", "returned"])
    parser.add_argument("--keep", type=Path, help="scratch directory to keep (default: a temporary one, removed)")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="warp-merger-memory-"))
    try:
        if not (root / "sft").is_dir():
            write_models(root, args.params, args.runs)
        policies = [root / f"policy-{m}" for m in range(1, args.runs + 1)]
        figures = {mode: measure(root / "sft", policies, root / "run", mode) for mode in args.modes}
        figures |= estimate(root / "sft", args.runs)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    figures["cpu"] = platform.processor() or platform.machine()
    if args.json:
        print(json.dumps(figures))
        return
    model_bytes = figures[args.modes[0]]["model_bytes"]
    print(f"model: {figures['params'] / 1e9:.2f}B parameters, {model_bytes / GIB:.2f} GiB fp32; M = {args.runs}")
    for mode in args.modes:
        f = figures[mode]
        grown = f["peak_rss"] - f["rss_before"]
        kinds = ", ".join(f"{k.removeprefix('Rss').lower()} {v / GIB:.2f}" for k, v in f["peaks_by_kind"].items())
        before, peak = f["rss_before"] / GIB, f["peak_rss"] / GIB
        print(f"{mode:>9}: {before:.2f} GiB before the merge, peak {peak:.2f} GiB ({grown / model_bytes:.2f} × the "
              f"model added; largest by kind: {kinds}), {f['seconds']:.1f} s")  # fmt: skip
    print("plan's estimate (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in figures["estimate_gib"].items()))


if __name__ == "__main__":
    main()
