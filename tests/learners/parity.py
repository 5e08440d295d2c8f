"""Learner parity across layouts: the same steps from the same weights and rollouts, under any ZeRO stage, rank
count, dtype and LoRA setting, inside long-lived Ray actors that build one learner after another.

A learner's start-up is mostly its process (Ray worker, torch, DeepSpeed imports) and its process group; a
DeepSpeed engine on the tiny model builds in a fraction of a second. So :class:`ParityPool` starts one
world-size-1 actor and two actors forming a 2-rank gloo group once, and each :meth:`ParityPool.run` builds a
fresh :class:`learners.learner.LearnerRank` in them (the process group is reused: ``init_process_group``), takes
its steps, reads out what parity compares, and destroys it. Dozens of layouts then cost seconds each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layout:
    """One learner layout: ZeRO stage, ranks, dtype, LoRA rank (0: full fine-tuning), persistence threshold."""

    stage: int
    ranks: int
    dtype: str
    lora: int = 0
    threshold: int = 100_000  # DeepSpeed's default, as the shipped recipes use
    lr: float = 1e-3

    @property
    def name(self) -> str:
        lora = f"-lora{self.lora}" if self.lora else ""
        lr = "" if self.lr == 1e-3 else f"-lr{self.lr:g}"
        return f"zero{self.stage}-r{self.ranks}-{self.dtype}{lora}-t{self.threshold}{lr}"


@dataclass
class Outcome:
    """What one layout's learner did: per-step metrics, fp32 master policy, anchor (accumulators, the module the
    anchor scores with, its log-probs of a probe batch)."""

    metrics: list[dict[str, Any]]
    policy: dict[str, np.ndarray]  # HF name → the optimizer's fp32 master (merged W for LoRA)
    anchor: dict[str, np.ndarray]  # the fp32 EMA accumulators (full tensors; LoRA: the factors)
    anchor_module: dict[str, np.ndarray]  # what the anchor's forward actually uses, gathered, as fp32
    anchor_logp: np.ndarray  # log π_ema of a probe batch
    start_policy: dict[str, np.ndarray]  # the same, before the first step
    start_anchor: dict[str, np.ndarray]
    adapter_tensors: int  # LoRA: tensors of the exported fp32 adapter; 0 otherwise
    masters: list[dict[str, np.ndarray]]  # with ``trace``: after each step, what the EMA must follow (fp32 masters;
    rounded: list[dict[str, np.ndarray]]  # LoRA: the factors), and the same in the model's dtype


def _learners_config(layout: Layout, **overrides: Any):
    from warp_rlhf.config import LearnersConfig, LoraConfig

    adapter = dict(rank=layout.lora, alpha=2.0 * layout.lora, target_modules=("q_proj", "v_proj"))
    kwargs = dict(ranks=layout.ranks, num_cpus=1, zero_stage=layout.stage, lr=layout.lr, warmup_steps=0,
                  micro_batch_size=2, baseline="mean", zero3_persistence_threshold=layout.threshold,
                  lora=LoraConfig(**adapter) if layout.lora else LoraConfig())  # fmt: skip
    return LearnersConfig(**(kwargs | overrides))


class _Worker:
    """One process of the pool: rank ``rank`` of ``world`` (its gloo group is joined by the first learner)."""

    def __init__(self, rank: int, world: int, master_addr: str, master_port: int) -> None:
        self.rank, self.world, self.addr, self.port = rank, world, master_addr, master_port

    def run(self, model_dir: str, layout: Layout, batches: list, probe, mu: float, beta: float, trace: bool = False
            ) -> Outcome | list:  # fmt: skip
        """Rank 0: the :class:`Outcome`; other ranks: their per-step metrics (the pool merges them)."""
        import torch

        from actors.rollout import to_tensors
        from learners.batching import split_groups
        from learners.distributed import full_parameters, master_parameters
        from learners.learner import LearnerRank
        from learners.lora import adapter_parameters

        cfg = _learners_config(layout)
        learner = LearnerRank(model_dir, cfg, beta=beta, mu=mu, dtype=layout.dtype, seed=0, rank=self.rank,
                              world_size=self.world, master_addr=self.addr, master_port=self.port)  # fmt: skip
        try:
            learner.load_init(model_dir)  # as the loop starts every run: θ_init's directory, read a tensor at a time
            start_policy = learner.weights(master=True)
            start_policy = None if start_policy is None else _arrays(start_policy.tensors())
            start_anchor = _arrays((learner.anchor.gathered() if learner.anchor.partitioned
                                    else learner.anchor.state_dict()).items())  # fmt: skip
            metrics, masters, rounded = [], [], []
            for table in batches:
                rows = split_groups(table.column("group_id").to_numpy(), self.world)[self.rank]
                metrics.append(learner.step(table.take(rows)))
                if trace and layout.lora:  # the factors (collective under ZeRO 1-2 with R = 2)
                    module = learner.engine.module
                    masters.append(_arrays(master_parameters(module, learner.engine.optimizer, trainable_only=True)))
                    rounded.append(_arrays(adapter_parameters(module)))
                elif trace:
                    masters.append(_arrays((learner.weights(master=True) or _Empty()).tensors()))
                    rounded.append(_arrays((learner.weights() or _Empty()).tensors()))
            policy = learner.weights(master=True)
            # LoRA: the adapter as the loop saves it (fp32 masters: a collective under ZeRO 1-2 with R = 2, which
            # hung when rank 0 alone took part).
            adapter = learner.adapter(master=True) if layout.lora else None
            anchor = learner.anchor
            ema = anchor.gathered() if anchor.partitioned else anchor.state_dict()  # gathered(): collective
            if layout.lora:  # the anchor's factors, as its forward swaps them into the policy
                with anchor.swapped_in():
                    held = _arrays(anchor.params.items())
            else:  # the anchor module's parameters as its forward reads them (gathered under ZeRO-3: collective)
                held = _arrays(full_parameters(anchor.module))
            batch = to_tensors(probe, learner.pad_id)
            with torch.no_grad():
                logp = anchor.sequence_logprobs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            if self.rank != 0:
                return metrics
            return Outcome(metrics=metrics, policy=_arrays(policy.tensors()), anchor=_arrays(ema.items()),
                           anchor_module=held, anchor_logp=logp.float().cpu().numpy(), start_policy=start_policy,
                           start_anchor=start_anchor, masters=masters, rounded=rounded,
                           adapter_tensors=len(adapter.weights.specs) if adapter is not None else 0)  # fmt: skip
        finally:
            learner.shutdown()


class ParityPool:
    """A world-size-1 worker and a 2-rank group, started once; :meth:`run` trains one layout in them."""

    def __init__(self) -> None:
        import ray

        from learners.distributed import free_port

        worker = ray.remote(num_cpus=1)(_Worker)
        self.single = worker.remote(0, 1, "127.0.0.1", free_port())
        port = free_port()
        self.pair = [worker.remote(r, 2, "127.0.0.1", port) for r in range(2)]

    def run(self, model_dir, layout: Layout, batches: list, probe, mu: float = 0.5, beta: float = 0.1,
            trace: bool = False, timeout_s: float = 300) -> Outcome:  # fmt: skip
        import ray

        workers = [self.single] if layout.ranks == 1 else self.pair
        from learners.group import merge_metrics

        refs = [w.run.remote(str(model_dir), layout, batches, probe, mu, beta, trace) for w in workers]
        outcome, *others = ray.get(refs, timeout=timeout_s)
        outcome.metrics = [merge_metrics([m, *(o[i] for o in others)]) for i, m in enumerate(outcome.metrics)]
        return outcome

    def shutdown(self) -> None:
        import ray

        for w in [self.single, *self.pair]:
            ray.kill(w)


class _Empty:  # what a rank other than 0 gets from weights(): nothing
    def tensors(self):
        return iter(())


def _arrays(pairs) -> dict[str, np.ndarray]:
    return {name: t.detach().float().cpu().numpy().copy() for name, t in pairs}


def relative_gap(
    test: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    start: dict[str, np.ndarray],
    test_start: dict[str, np.ndarray] | None = None,
) -> float:
    """‖(test − test_start) − (reference − start)‖ / ‖reference − start‖ over all tensors: how far the layout's
    *update* is from the reference's, relative to the update itself (weights barely move in a few steps, so
    comparing the weights alone would pass anything). ``test_start`` (default ``start``): where the test started,
    when that is another rounding of θ_init (a bf16 learner against the fp32 one)."""
    test_start = start if test_start is None else test_start
    num = den = 0.0
    for name, ref in reference.items():
        d_ref = ref.astype(np.float64) - start[name]
        d_test = test[name].astype(np.float64) - test_start[name]
        num += float(((d_test - d_ref) ** 2).sum())
        den += float((d_ref**2).sum())
    return (num / den) ** 0.5 if den else float("inf")
