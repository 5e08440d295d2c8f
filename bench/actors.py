"""Benchmark of the actors package (issue 4, requirement 7), ratios measured in one run.

1. Generation: ActorPool tokens/s against a bare in-process ``vllm.LLM.generate`` with the same engine
   settings and sampling (goal: ratio >= 0.9).
2. Weight loading: time to load new weights into a running engine, per transport, against a plain
   in-process copy of the same bytes (goal: ratio <= 3).

    python bench/actors.py [--model smollm2-135m] [--dtype bfloat16] [--prompts 16] [--engines 1]

Imports vllm and ray inside main() only; the engine-building code sits under the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

# `python bench/actors.py` puts bench/ first on sys.path, where this file would shadow the actors package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_STEMS = ["The film opens on", "I expected a dull sequel, but", "The acting was", "Honestly the plot"]


def _prompts(count: int) -> list[str]:
    return [f"{PROMPT_STEMS[i % len(PROMPT_STEMS)]} (review {i})" for i in range(count)]


def bare_engine(model_dir: str, cfg, dtype: str):  # noqa: ANN001
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype=dtype,
        seed=0,
        max_model_len=cfg.max_model_len,
        kv_cache_memory_bytes=int(cfg.kv_cache_gib * (1 << 30)),
        enforce_eager=True,
        logprobs_mode="raw_logprobs",
    )
    params = SamplingParams(
        n=cfg.samples_per_prompt, temperature=cfg.temperature, top_k=cfg.top_k, max_tokens=cfg.max_new_tokens,
        logprobs=0,
    )  # fmt: skip
    return llm, params


def bare_tokens_per_s(llm, params, prompts: list[str]) -> float:  # noqa: ANN001
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(s.token_ids) for o in outputs for s in o.outputs) / (time.perf_counter() - start)


def pool_tokens_per_s(pool, prompts: list[str]) -> float:  # noqa: ANN001
    import pyarrow.compute as pc

    start = time.perf_counter()
    table = pool.generate(prompts)
    return pc.sum(pc.list_value_length(table.column("completion_ids"))).as_py() / (time.perf_counter() - start)


def interleaved_generation(llm, params, pool, prompts: list[str], reps: int) -> tuple[float, float]:  # noqa: ANN001
    """Median tokens/s of each, alternating runs so that load from other processes hits both alike."""
    bare_tokens_per_s(llm, params, prompts[:2])  # warm-up
    pool_tokens_per_s(pool, prompts[:2])
    bare, pooled = [], []
    for _ in range(reps):
        bare.append(bare_tokens_per_s(llm, params, prompts))
        pooled.append(pool_tokens_per_s(pool, prompts))
    return statistics.median(bare), statistics.median(pooled)


def copy_seconds(flat, reps: int) -> float:  # noqa: ANN001
    import numpy as np

    target = np.empty_like(flat.buffer)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(target, flat.buffer)
        times.append(time.perf_counter() - start)
    return min(times)


def sync_seconds(pool, flat, reps: int, put_once: bool) -> float:  # noqa: ANN001
    import ray

    times = []
    for rep in range(reps):
        start = time.perf_counter()
        pool.sync(ray.put(flat) if put_once else flat, version=100 + rep)  # the learner's put is counted
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.pool import ActorPool
    from merger.flat import flatten
    from warp_rlhf.config import ActorsConfig
    from warp_rlhf.models import resolve_model

    model_dir = str(resolve_model(args.model, dtype=args.dtype))
    cpus = os.cpu_count() or 2
    cfg = ActorsConfig(engines_per_run=args.engines, num_cpus=cpus / args.engines, kv_cache_gib=1.0,
                       max_model_len=512, samples_per_prompt=4, max_new_tokens=48)  # fmt: skip
    prompts = _prompts(args.prompts)
    results: dict[str, float] = {}
    llm, params = bare_engine(model_dir, cfg, args.dtype)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    tied = model.config.tie_word_embeddings
    flat = flatten((n, t) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight"))
    del model
    results["weights_mb"] = flat.nbytes / 1e6
    results["copy_s"] = copy_seconds(flat, args.reps)

    env = {k: os.environ[k] for k in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "TOKENIZERS_PARALLELISM", "WARP_RLHF_CACHE")
           if k in os.environ}  # fmt: skip
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    for transport in ("object_store", "collective"):
        pool = ActorPool(model_dir, dataclasses.replace(cfg, weight_transport=transport), dtype=args.dtype)
        try:
            if transport == "object_store":
                bare, pooled = interleaved_generation(llm, params, pool, prompts, args.reps)
                results["bare_tok_s"], results["pool_tok_s"] = bare, pooled
            results[f"{transport}_load_s"] = sync_seconds(pool, flat, args.reps, put_once=transport == "object_store")
        finally:
            pool.shutdown()
    ray.shutdown()
    llm.llm_engine.engine_core.shutdown()

    results["generation_ratio"] = results["pool_tok_s"] / results["bare_tok_s"]
    for transport in ("object_store", "collective"):
        results[f"{transport}_load_ratio"] = results[f"{transport}_load_s"] / results["copy_s"]
    print(json.dumps({k: round(v, 4) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
