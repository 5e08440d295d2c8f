"""Benchmark: one LearnerRank step against a plain PyTorch REINFORCE step on the same model and batch.

Both do the same work per step: anchor log-probs (no grad), policy forward/backward on the
KL-shaped reward with the RLOO baseline, gradient clipping, AdamW on fp32 master weights of a bf16
model, the EMA update of the anchor. The plain loop has no DeepSpeed, no process group, no
non-finite checks. Steps alternate between the two so that load from other processes hits both
alike. A third column, AdamW directly on bf16 weights (no fp32 master), is what a naive loop does:
faster, but at lr 1e-6 most bf16 updates round away to nothing. Each row also gives ``phases_s``: the
medians of anchor forward, policy forward, backward, optimizer (clip + AdamW + master copy), EMA
update and weight publish, for the learner (from its step metrics) next to the plain step (timed the
same way). Publish is what the learner does for the engines after each step: ``weights()``, the policy
packed into one FlatWeights buffer (a ZeRO-3 group: gathered, and rank 0's put in the object store);
the plain step's peer is the least any publish does, one ``torch.cat`` of the weights into one host buffer.

    .venv/bin/python -m bench.learners --stages 0 1 2
    .venv/bin/python -m bench.learners --stages --zero3-ranks 1 2 --dtype float32
    .venv/bin/python -m bench.learners --stages 0 --unshared
    python -m bench.learners --device cuda --model DIR --stages 0 2   # one GPU: learner (num_gpus 1) vs plain

On CUDA both steps run on the GPU and every phase ends with a device synchronise (the learner's clock does it
there too), so phases are kernel time, not launch time.

The learner runs with ``learners.share_prompts: auto`` (each prompt computed once per micro-batch on CPU
ranks without ZeRO-3; every row's prompt computed on a GPU and under ZeRO-3), and the plain step does as the
learner does. ``--unshared`` adds a third step in the alternation, the learner with the other setting, and
reports both (``shared_s``, ``unshared_s``) and the ratio between them.

``--zero3-ranks`` runs ZeRO-3 learners of R ranks (Ray actors, gloo, every parameter partitioned:
persistence threshold 0) and reports the EMA anchor's bytes per rank, measured from the tensors each
rank holds, next to the full anchor a ZeRO 0-2 rank holds, and the step time against the plain step.

(as a module from the repository root: this file is named like the package it measures.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.rollout import ROLLOUT_SCHEMA, to_tensors
from learners.objective import advantages, attention_for, kl_shaped_reward, reinforce_loss, sequence_logprobs
from learners.timing import Phases
from warp_rlhf.config import LearnersConfig
from warp_rlhf.models import resolve_model


def make_batch(prompts: int, samples: int, prompt_len: int, new_tokens: int, vocab: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    groups = [rng.integers(10, vocab, prompt_len).tolist() for _ in range(prompts)]
    rows = [(g, groups[g]) for g in range(prompts) for _ in range(samples)]  # a group's samples share its prompt
    completions = [rng.integers(10, vocab, new_tokens).tolist() for _ in rows]
    n = len(rows)
    return pa.table(
        {
            "prompt": [""] * n,
            "prompt_ids": [p for _, p in rows],
            "completion": [""] * n,
            "completion_ids": completions,
            "logprobs": [[0.0] * new_tokens] * n,
            "finish_reason": ["length"] * n,
            "reward": rng.normal(size=n).astype(np.float32),
            "group_id": [g for g, _ in rows],
            "run": [0] * n,
            "iteration": [1] * n,
            "step": [0] * n,
            "version": [0] * n,
            "engine": [0] * n,
        },
        schema=ROLLOUT_SCHEMA,
    )


class PlainStep:
    """The same REINFORCE step in plain PyTorch: a bf16 model, fp32 master weights, torch AdamW."""

    def __init__(
        self,
        model_dir,
        cfg: LearnersConfig,
        beta: float,
        mu: float,
        fp32_master: bool = True,
        dtype: str = "bfloat16",
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        # As the learner loads it.
        load = dict(dtype=getattr(torch, dtype), attn_implementation=attention_for(self.device, dtype))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **load).to(self.device)
        self.anchor = AutoModelForCausalLM.from_pretrained(model_dir, **load).to(self.device).eval()
        fp32_master = fp32_master and dtype != "float32"
        self.anchor.requires_grad_(False)
        self.ema = [p.detach().float() for p in self.anchor.parameters()]
        params = list(self.model.parameters())
        self.master = [p.detach().float().requires_grad_() for p in params] if fp32_master else params
        kw = dict(lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=True)
        self.optimizer = torch.optim.AdamW(self.master, **kw)
        self.cfg, self.beta, self.mu, self.fp32_master = cfg, beta, mu, fp32_master
        self.share = cfg.shares_prompts  # as the learner of the same config does; run() sets it per ZeRO stage

    def step(self, table: pa.Table) -> dict[str, float]:
        """One step; returns its seconds per phase, named as the learner's metrics name them."""
        clock = Phases.on(self.device)
        batch = {k: v.to(self.device) for k, v in to_tensors(table, 0).items()}
        inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        reward = torch.from_numpy(table.column("reward").to_numpy()).to(self.device)
        group = torch.from_numpy(table.column("group_id").to_numpy().copy()).to(self.device)
        with clock("anchor"), torch.no_grad():
            logp_anchor = sequence_logprobs(self.anchor, *inputs, share_prompts=self.share)
        with clock("forward"):
            logp = sequence_logprobs(self.model, *inputs, share_prompts=self.share)
            adv = advantages(kl_shaped_reward(reward, logp, logp_anchor, self.beta), group, self.cfg.baseline)
            loss = reinforce_loss(logp, adv)
        with clock("backward"):
            loss.backward()
        with clock("optimizer"):
            params = list(self.model.parameters())
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            if self.fp32_master:
                for m, p in zip(self.master, params, strict=True):
                    m.grad = p.grad.float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)
            if self.fp32_master:
                with torch.no_grad():
                    torch._foreach_copy_(params, self.master)
        with clock("ema"), torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.float() for p in params], self.mu)
            torch._foreach_copy_(list(self.anchor.parameters()), self.ema)
        with clock("publish"), torch.no_grad():
            self.published = torch.cat([p.detach().reshape(-1) for p in params]).cpu()  # a no-op on CPU
        return clock.seconds


def publishing(step: Callable[[pa.Table], dict], publish: Callable[[], Any]) -> Callable[[pa.Table], dict]:
    """A step followed by the weight publish the training loop does after it, timed as phase ``publish``."""

    def step_and_publish(table: pa.Table) -> dict:
        metrics = step(table)
        start = time.perf_counter()
        publish()
        return metrics | {"time_publish_s": time.perf_counter() - start}

    return step_and_publish


def median_seconds(steps: dict, table: pa.Table, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each step function; they alternate, so load from other processes hits them alike.

    A step that returns its phases (``time_<phase>_s``, as the learner's metrics and PlainStep do) also
    gets ``<name>.<phase>`` medians.
    """
    times: dict[str, list[float]] = {}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            result = step(table)
            seconds = time.perf_counter() - start
            if i < warmup:
                continue
            times.setdefault(name, []).append(seconds)
            for key, value in (result or {}).items():
                if key.startswith("time_") and key.endswith("_s"):
                    times.setdefault(f"{name}.{key[5:-2]}", []).append(value)
    return {name: statistics.median(values) for name, values in times.items()}


def breakdown(med: dict[str, float], names: tuple[str, ...] = ("learner", "plain")) -> dict[str, dict[str, float]]:
    """{phase: {name: median seconds}} for the phases the steps reported."""
    phases: dict[str, dict[str, float]] = {}
    for key, seconds in med.items():
        name, _, phase = key.partition(".")
        if phase and name in names:
            phases.setdefault(phase, {})[name] = round(seconds, 3)
    return phases


def run(args: argparse.Namespace) -> list[dict]:
    from learners.learner import LearnerRank

    model_dir = resolve_model(args.model, dtype=args.dtype)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    table = make_batch(args.prompts, args.samples, args.prompt_len, args.new_tokens, vocab=vocab)
    completion_tokens = args.prompts * args.samples * args.new_tokens
    gpus = 1.0 if args.device == "cuda" else 0.0
    base_cfg = LearnersConfig(num_gpus=gpus, lr=1e-6, warmup_steps=0, micro_batch_size=args.micro_batch_size)
    plain = PlainStep(model_dir, base_cfg, beta=0.1, mu=0.01, dtype=args.dtype, device=args.device)
    naive = PlainStep(model_dir, base_cfg, beta=0.1, mu=0.01, fp32_master=False, dtype=args.dtype, device=args.device)
    rows = []
    for stage in args.stages:
        cfg = LearnersConfig(zero_stage=stage, num_gpus=gpus, lr=1e-6, warmup_steps=0,
                             micro_batch_size=args.micro_batch_size)  # fmt: skip
        learner = LearnerRank(model_dir, cfg, beta=0.1, mu=0.01, dtype=args.dtype)
        plain.share = naive.share = cfg.shares_prompts
        steps = {"plain": plain.step, "learner": publishing(learner.step, learner.weights), "naive": naive.step}
        if args.unshared:
            name, flipped = other_sharing(cfg)
            other = LearnerRank(model_dir, flipped, beta=0.1, mu=0.01, dtype=args.dtype)
            steps[name] = publishing(other.step, other.weights)
        med = median_seconds(steps, table, args.warmup, args.steps)
        learner.shutdown()
        if args.unshared:
            other.shutdown()
        row = {
            "zero_stage": stage,
            "learner_s": round(med["learner"], 3),
            "plain_s": round(med["plain"], 3),
            "ratio": round(med["learner"] / med["plain"], 3),
            "naive_bf16_s": round(med["naive"], 3),
            "learner_completion_tok_s": round(completion_tokens / med["learner"], 1),
            "plain_completion_tok_s": round(completion_tokens / med["plain"], 1),
            "phases_s": breakdown(med),
        }
        row |= sharing_columns(med, cfg) if args.unshared else {}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.zero3_ranks:
        rows += zero3_rows(args, model_dir, table, plain)
    return rows


def other_sharing(cfg: LearnersConfig) -> tuple[str, LearnersConfig]:
    """(name, config) of the learner with the other ``share_prompts`` setting than ``cfg`` resolves to."""
    name = "unshared" if cfg.shares_prompts else "shared"
    return name, replace(cfg, share_prompts=not cfg.shares_prompts)


def sharing_columns(med: dict[str, float], cfg: LearnersConfig) -> dict:
    """The learner with and without shared prompts (one of them is ``learner``): seconds, ratio, phases."""
    other, _ = other_sharing(cfg)
    shared, unshared = (med["learner"], med[other]) if other == "unshared" else (med[other], med["learner"])
    return {
        "shares_prompts": cfg.shares_prompts,
        "shared_s": round(shared, 3),
        "unshared_s": round(unshared, 3),
        "shared_vs_unshared": round(shared / unshared, 3),
        "phases_s": breakdown(med, ("learner", "plain", other)),
    }


def zero3_rows(args: argparse.Namespace, model_dir, table: pa.Table, plain: PlainStep) -> list[dict]:
    """ZeRO-3 learners of R ranks on a local Ray cluster: anchor bytes per rank and step time vs the plain step."""
    import ray

    from learners.group import LearnerGroup

    params = sum(p.numel() for p in plain.model.parameters())
    full_anchor = sum(p.numel() * p.element_size() for p in plain.anchor.parameters())
    full_anchor += 0 if args.dtype == "float32" else sum(t.numel() * 4 for t in plain.ema)  # fp32 accumulators
    learners = 2 if args.unshared else 1  # their ranks all live at once, one CPU each
    ray.init(num_cpus=max(2, *args.zero3_ranks) * learners, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for ranks in args.zero3_ranks:
            cfg = LearnersConfig(ranks=ranks, num_cpus=1, zero_stage=3, lr=1e-6, warmup_steps=0,
                                 micro_batch_size=args.micro_batch_size, zero3_persistence_threshold=0)  # fmt: skip
            groups = {"learner": LearnerGroup(model_dir, cfg, beta=0.1, mu=0.01, dtype=args.dtype)}
            if args.unshared:
                name, flipped = other_sharing(cfg)
                groups[name] = LearnerGroup(model_dir, flipped, beta=0.1, mu=0.01, dtype=args.dtype)
            for group in groups.values():
                group.ready()
            ranks_of_learner = groups["learner"].ranks
            held = ray.get([r.__ray_call__.remote(lambda self: self.anchor.local_bytes()) for r in ranks_of_learner])
            plain.share = cfg.shares_prompts
            steps = {"plain": plain.step}
            for name, group in groups.items():
                # The loop hands rank 0's object-store ref to the engines; it never fetches it itself.
                publish = lambda group=group: ray.wait([group.weights_ref()])  # noqa: E731
                steps[name] = publishing(group.step, publish)
            med = median_seconds(steps, table, args.warmup, args.steps)
            for group in groups.values():
                group.shutdown()
            row = {
                "zero_stage": 3,
                "ranks": ranks,
                "params": params,
                "anchor_mib_per_rank": round(max(held) / 2**20, 1),
                "full_anchor_mib": round(full_anchor / 2**20, 1),
                "learner_s": round(med["learner"], 3),
                "plain_s": round(med["plain"], 3),
                "ratio": round(med["learner"] / med["plain"], 3),
                "phases_s": breakdown(med),
            } | (sharing_columns(med, cfg) if args.unshared else {})
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory (default smollm2-135m)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both steps compute")
    parser.add_argument("--zero3-ranks", type=int, nargs="*", default=[], help="ZeRO-3 learners of these ranks")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument(
        "--unshared",
        action="store_true",
        help="also time the learner with the other learners.share_prompts setting than auto picks",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    shape = f"{args.prompts}x{args.samples}, {args.prompt_len} prompt + {args.new_tokens} new tokens"
    if args.device == "cuda" and args.zero3_ranks:
        parser.error("--zero3-ranks runs gloo ranks on the CPU; leave it out with --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"torch threads {torch.get_num_threads()}"
    print(f"{where}; {args.dtype}; batch {shape}; medians of {args.steps} steps", flush=True)
    run(args)


if __name__ == "__main__":
    main()
