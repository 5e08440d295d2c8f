"""Benchmark: TRL's RLOOTrainer, then one WARP step, on the same work in one invocation; both medians and the ratio.

For each dtype asked (default: float32 and the best one for this machine as `model.dtype: auto` resolves it),
first TRL 1.16's RLOOTrainer trains SmolLM2-135M for ``--steps`` steps (in a child process, so each dtype
starts clean), then `warp-rlhf train` runs the demo with M = 1 for as many steps (bench/warp_step.py's
:func:`measure_warp_step`). TRL's step is timed by a TrainerCallback from on_step_begin to on_step_end
(generation, scoring, the log-prob passes, the micro-batches' forward/backward, clipping, AdamW, the
reference update), and within it TRL's sampling (its ``_generate``: tokenise, transformers ``generate``,
decode) to split it into generate and the rest; WARP's is generate + learn + sync from metrics.parquet. The
first ``--warmup`` steps of each are left out; each figure is the median of the rest. Each TRL step prints its
loss, reward, KL, lr and gradient norm; the loss reads ≈ 0 by construction (with the ratio at 1 it is −mean(A),
and leave-one-out advantages nearly cancel within a group) while its gradient is not: grad_norm > 0 and the
weights move.

    make bench-peer                       # installs the `bench` extra (trl), then runs this
    .venv/bin/python bench/peer_trl.py [--steps 8] [--warmup 2] [--dtype float32 bfloat16 auto] [--only both]

The same in both, taken from configs/demo.yaml and the project's own code: θ_sft from
``resolve_model("smollm2-135m", dtype)`` in that dtype; the packaged training prompts (``load_prompts``);
8 prompts × 4 samples per step (32 completions), at most 16 new tokens, stopping at end of sequence,
temperature 0.9, top-k 50; the VADER reward of actors/rewards.py on the completion; the sequence-level
KL-shaped reward r − β(log π_T − log π_ref,T) with β = 0.05 and log-probs at the sampling temperature;
the RLOO leave-one-out baseline, no advantage normalisation; loss −Σ A·log π / 32 over 2 micro-batches
of 16 (TRL's clipped ratio is 1, up to rounding, with num_iterations = 1, so its gradient is this one); the
learner's own AdamW (learners.distributed.make_optimizer: fused, β 0.9/0.999, ε 1e-8, no weight decay)
and lr 6e-5 with its linear warm-up over 1 step (make_schedule), gradient clip 1.0; the reference is an
EMA of the policy with μ = 0.01 updated after every step (TRL: sync_ref_model with
ref_model_mixup_alpha = μ and ref_model_sync_steps = 1, its TR-DPO option; ``--trl-reference sft`` keeps
TRL's default fixed θ_sft reference instead); ``--cpus`` cores (2): TRL's torch threads, WARP's engine
and learner num_cpus; seed 0; on the CPU even where a GPU is present (the demo's learners and engines
use none).

What stays different, by each tool's design:
- Generation: TRL samples with transformers' ``generate`` in the training process (32 left-padded rows,
  each prompt repeated 4 times; its default on CPU, no vLLM), WARP with a vLLM engine (n = 4 per prompt)
  whose weights are synced after every step; TRL has nothing to sync. Each tool draws its own shuffled
  prompt order (seed 0), so the prompts, hence the completion lengths, of a given step differ.
- Passes over the batch: TRL computes the policy's log-probs in an extra no-grad pass before the
  training pass (its ``old_logps``); WARP takes them from the training forward. TRL keeps its default
  gradient checkpointing (``gradient_checkpointing=True``: a second forward inside the backward) unless
  ``--trl-gradient-checkpointing off``; WARP does not checkpoint. TRL scores log-probs with its chunked
  fused LM head, WARP with a log-softmax over the completion positions.
- bfloat16: TRL (transformers' Trainer) trains the bf16 weights directly, AdamW moments in bf16, under
  bf16 autocast, and its EMA reference is updated in bf16; WARP's DeepSpeed bf16 keeps fp32 master weights
  and its anchor an fp32 accumulator. float32 is float32 in both.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python bench/peer_trl.py` puts bench/ first on sys.path, where bench/actors.py would shadow the actors
# package; the repository root takes its place, so that `bench.warp_step` imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = ("float32", "bfloat16", "auto")


def demo_config(dtype: str = "auto"):
    from bench.warp_step import DEMO_CONFIG
    from warp_rlhf.config import load_config

    return load_config(DEMO_CONFIG, [f"model.dtype={dtype}"])


def resolve_dtypes(asked: list[str] | None) -> list[str]:
    """Concrete dtypes, in order, without repeats; ``auto`` → what the demo's ``model.dtype: auto`` picks here."""
    from warp_rlhf.hardware import resolve_dtype

    best = resolve_dtype(demo_config("auto"))[0].model.dtype
    out: list[str] = []
    for dtype in asked or ["float32", best]:
        concrete = best if dtype == "auto" else dtype
        if concrete not in out:
            out.append(concrete)
    return out


def rloo_config(cfg, output_dir: str, max_steps: int, gradient_checkpointing: bool, ema_reference: bool):
    """TRL's RLOOConfig for the demo's work per step (the optimizer and schedule are passed to the trainer)."""
    from trl import RLOOConfig

    completions = cfg.warp.prompts_per_step * cfg.actors.samples_per_prompt  # 32 per step
    micro = cfg.learners.micro_batch_size  # 16
    if completions % micro:
        raise ValueError(f"{completions} completions per step do not split into micro-batches of {micro}")
    return RLOOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        seed=cfg.seed,
        use_cpu=True,
        bf16=cfg.model.dtype == "bfloat16",  # TRL's default is True: bf16 autocast over an fp32 model
        fp16=False,
        gradient_checkpointing=gradient_checkpointing,
        # One generation batch of 32 completions per optimizer step, trained as 2 micro-batches of 16.
        num_generations=cfg.actors.samples_per_prompt,
        generation_batch_size=completions,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro,
        num_iterations=1,
        shuffle_dataset=True,
        # Sampling (transformers generate: TRL's default, and its only local sampler on a CPU).
        use_vllm=False,
        max_completion_length=cfg.actors.max_new_tokens,
        temperature=cfg.actors.temperature,
        top_k=max(cfg.actors.top_k, 0),  # WARP's -1 (off) is TRL's 0
        top_p=1.0,
        # Objective.
        beta=cfg.warp.beta,
        normalize_advantages=False,
        mask_truncated_completions=False,
        sync_ref_model=ema_reference,
        ref_model_mixup_alpha=cfg.warp.mu,
        ref_model_sync_steps=1,
        # Optimisation: the trainer gets the learner's own AdamW and schedule; these record the same values.
        learning_rate=cfg.learners.lr,
        adam_beta1=cfg.learners.adam_betas[0],
        adam_beta2=cfg.learners.adam_betas[1],
        adam_epsilon=1e-8,
        weight_decay=cfg.learners.weight_decay,
        max_grad_norm=cfg.learners.grad_clip,
        # Logging every step (after on_step_end: outside the timed span); nothing saved.
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def measure_trl_step(
    dtype: str, steps: int, warmup: int, threads: int, gradient_checkpointing: bool = True, ema_reference: bool = True
) -> dict:
    """Train ``steps`` RLOOTrainer steps in this process; medians over the steps after ``warmup``."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import RLOOTrainer

    from actors.rewards import VaderReward, checked_scores
    from learners.distributed import make_optimizer, make_schedule
    from warp_rlhf.data import load_prompts
    from warp_rlhf.models import resolve_model

    cfg = demo_config(dtype)
    model_dir = resolve_model(cfg.model.path, dtype)
    prompts = load_prompts(cfg.data.train, cfg.data.prompt_column, "train")
    reward = VaderReward()
    tokens: list[int] = []  # completion tokens of each step's generation batch

    def vader(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: object) -> list[float]:
        tokens.append(sum(len(ids) for ids in completion_ids))
        return checked_scores(reward, prompts, completions).tolist()

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, on_step_begin → on_step_end, and the step's logged metrics."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.logs: list[dict] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.logs.append(dict(logs))
            seconds = self.seconds[-1] if self.seconds else float("nan")
            keys = ("loss", "reward", "kl", "learning_rate", "grad_norm")
            values = {key: logs.get(key, float("nan")) for key in keys}
            print(
                f"  TRL {dtype} step {state.global_step}/{steps}: {seconds:6.2f} s  loss {values['loss']:+.4f}  "
                f"reward {values['reward']:+.3f}  kl {values['kl']:+.4f}  lr {values['learning_rate']:.2e}  "
                f"grad_norm {values['grad_norm']:.3f}",
                file=sys.stderr,
                flush=True,
            )

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    probe_name, probe = next((n, p) for n, p in model.named_parameters() if p.ndim == 2 and p.numel() < 10**7)
    before = probe.detach().clone()
    optimizer = make_optimizer(model.parameters(), cfg.learners)
    schedule = make_schedule(optimizer, cfg.learners.warmup_steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=vader,
            args=rloo_config(cfg, tmp, steps, gradient_checkpointing, ema_reference),
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            optimizers=(optimizer, schedule),
        )
        trainer.remove_callback(PrinterCallback)  # StepTimer prints one line per step instead
        generating: list[float] = []  # seconds in TRL's own sampling (tokenise, generate, decode) per step
        sample = trainer._generate

        def timed_generate(*a, **kw):
            began = time.perf_counter()
            try:
                return sample(*a, **kw)
            finally:
                generating.append(time.perf_counter() - began)

        trainer._generate = timed_generate
        timer = StepTimer()
        trainer.add_callback(timer)  # last, so that its on_step_end follows the reference (EMA) update
        trainer.train()
    if not len(timer.seconds) == len(tokens) == len(generating) == steps:
        raise RuntimeError(f"expected {steps} steps and generation batches, timed {len(timer.seconds)} steps and "
                           f"{len(generating)} generations, scored {len(tokens)} batches")  # fmt: skip
    seconds, counts = timer.seconds[warmup:], tokens[warmup:]
    return {
        "dtype": dtype,
        "steps": len(seconds),
        "step_s": statistics.median(seconds),
        "generate_s": statistics.median(generating[warmup:]),
        "rest_s": statistics.median(s - g for s, g in zip(seconds, generating[warmup:], strict=True)),
        "completion_tokens_per_s": statistics.median(n / s for n, s in zip(counts, seconds, strict=True)),
        "warmup_step_s": timer.seconds[:warmup],
        "all_step_s": timer.seconds,
        "completion_tokens": tokens,
        "loss": [log["loss"] for log in timer.logs],
        "reward": [log.get("reward") for log in timer.logs],
        "kl": [log.get("kl") for log in timer.logs],
        "weights_moved": {probe_name: float((probe.detach().float() - before.float()).abs().max())},
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "reference": "ema" if ema_reference else "sft",
        "threads": torch.get_num_threads(),
        "trl": importlib.metadata.version("trl"),
    }


def run_trl(dtype: str, args: argparse.Namespace) -> dict:
    """:func:`measure_trl_step` in a child process (a fresh Accelerate state and memory per dtype)."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--dtype", dtype, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--cpus", str(args.cpus),
        "--trl-gradient-checkpointing", args.trl_gradient_checkpointing, "--trl-reference", args.trl_reference,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(args.cpus)}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # its stderr (progress) passes through
    if done.returncode != 0:
        raise SystemExit(f"the TRL measurement for {dtype} exited with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(value: float | None, width: int, spec: str, unit: str = "") -> str:
    """``value`` formatted and right-aligned in ``width`` columns; an em dash where the tool was not run."""
    return format("—" if value is None else format(value, spec) + unit, f">{width}")


def print_table(rows: list[dict], cpu: str, bf16_flags: list[str], args: argparse.Namespace) -> None:
    measured = args.steps - args.warmup
    print(f"\nCPU: {cpu}; avx512_bf16: {'yes' if 'avx512_bf16' in bf16_flags else 'no'}"
          f"{'; amx_bf16: yes' if 'amx_bf16' in bf16_flags else ''}; {args.cpus} threads/cpus per tool; "
          f"medians of {measured} step(s) after {args.warmup} warm-up step(s)")  # fmt: skip
    head = (f"{'dtype':<9} {'TRL step':>9} {'generate':>9} {'rest':>7} {'WARP step':>10} {'generate':>9} "
            f"{'learn':>7} {'sync':>6} {'WARP/TRL':>9} {'TRL tok/s':>10} {'WARP tok/s':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in rows:
        trl, warp = row.get("trl") or {}, row.get("warp") or {}
        cells = [
            f"{row['dtype']:<9}",
            cell(trl.get("step_s"), 9, ".2f", " s"),
            cell(trl.get("generate_s"), 9, ".2f", " s"),
            cell(trl.get("rest_s"), 7, ".2f", " s"),
            cell(warp.get("step_s"), 10, ".2f", " s"),
            cell(warp.get("generate_s"), 9, ".2f", " s"),
            cell(warp.get("learn_s"), 7, ".2f", " s"),
            cell(warp.get("sync_s"), 6, ".2f", " s"),
            cell(row.get("ratio"), 9, ".2f"),
            cell(trl.get("completion_tokens_per_s"), 10, ".0f"),
            cell(warp.get("completion_tokens_per_s"), 11, ".0f"),
        ]
        print(" ".join(cells))
    trl_rows = [row["trl"] for row in rows if row.get("trl")]
    if trl_rows:
        first = trl_rows[0]
        checkpointing = "on" if first["gradient_checkpointing"] else "off"
        reference = "an EMA (as WARP's anchor)" if first["reference"] == "ema" else "the fixed θ_sft"
        print(f"TRL {first['trl']}: gradient checkpointing {checkpointing}, reference {reference}; its generate is "
              "its own sampling (tokenise, transformers generate, decode), its rest the scoring, the policy's and "
              "the reference's log-prob passes, the training pass, AdamW and the reference update")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps each tool runs, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: float32 and what auto picks here")
    parser.add_argument("--only", choices=("trl", "warp", "both"), default="both", help="which tool(s) to run")
    parser.add_argument("--cpus", type=int, default=2, help="TRL's torch threads; WARP's engine and learner num_cpus")
    parser.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on", help="on: TRL's default")
    parser.add_argument(
        "--trl-reference",
        choices=("ema", "sft"),
        default="ema",
        help="ema: an EMA like WARP's anchor (TRL's sync_ref_model); sft: TRL's default, the fixed θ_sft",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")

    if args.worker:  # one TRL measurement: progress to stderr, the result as the last line of stdout
        with contextlib.redirect_stdout(sys.stderr):
            result = measure_trl_step(args.dtype[0], args.steps, args.warmup, args.cpus,
                                      args.trl_gradient_checkpointing == "on", args.trl_reference == "ema")  # fmt: skip
        print(json.dumps(result), flush=True)
        return

    from bench.warp_step import measure_warp_step
    from warp_rlhf.hardware import BF16_CPU_FLAGS, cpu_info

    cpu, flags = cpu_info()
    bf16_flags = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    rows = []
    for dtype in resolve_dtypes(args.dtype):
        row: dict = {"dtype": dtype}
        if args.only in ("trl", "both"):
            print(f"[{dtype}] TRL RLOOTrainer, {args.steps} steps ...", file=sys.stderr, flush=True)
            row["trl"] = run_trl(dtype, args)
            print(f"[{dtype}] TRL step median {row['trl']['step_s']:.2f} s", file=sys.stderr, flush=True)
        if args.only in ("warp", "both"):
            print(f"[{dtype}] WARP (warp-rlhf train, demo config, M = 1), {args.steps} steps ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            row["warp"] = measure_warp_step(args.steps, args.warmup, float(args.cpus), dtype)
            print(f"[{dtype}] WARP step median {row['warp']['step_s']:.2f} s", file=sys.stderr, flush=True)
        if row.get("trl") and row.get("warp"):
            row["ratio"] = row["warp"]["step_s"] / row["trl"]["step_s"]
        rows.append(row)
    print_table(rows, cpu, bf16_flags, args)
    summary = {"cpu": cpu, "bf16_flags": bf16_flags, "cpus": args.cpus, "steps": args.steps, "warmup": args.warmup,
               "command": " ".join(["bench/peer_trl.py", *sys.argv[1:]]), "rows": rows}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
