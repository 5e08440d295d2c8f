"""LearnerRank: one DeepSpeed rank doing REINFORCE on the KL-shaped reward, with the run's EMA anchor.

Owns one rank's step (log-probs under policy and anchor, shaped reward, baseline, loss, backward with
our own gradient accumulation, Adam step, EMA update), non-finite protection, full-weight export in
FlatWeights form or as a collective broadcast to the engines (:mod:`learners.publish`), the reset to
θ_init, and resume state (on disk: :mod:`learners.state`). A plain class: it works in-process (world
size 1) and LearnerGroup makes R of them Ray actors. Imports torch, deepspeed and transformers lazily;
from ``actors`` only the wire contracts (``actors.rollout``, ``actors.broadcast``, ``actors.adapter``); never Ray
or vLLM.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.rollout import to_tensors
from learners import lora
from learners.anchor import EmaAnchor, PartitionedAnchor
from learners.batching import pack_micro_batches
from learners.distributed import (
    agree,
    agree_sum,
    barrier,
    deepspeed_config,
    full_parameters,
    init_process_group,
    load_master_parameters,
    make_optimizer,
    make_schedule,
    master_parameters,
    zero3,
)
from learners.objective import (
    add_drift,
    advantages,
    attention_for,
    kl_shaped_reward,
    reinforce_loss,
    sequence_logprobs_and_entropy,
)
from learners.publish import Broadcaster
from learners.state import load_rank_state, save_rank_state
from learners.timing import Phases

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from actors.adapter import AdapterWeights
    from merger.checkpoint import CheckpointState
    from merger.flat import FlatWeights
    from warp_rlhf.config import LearnersConfig

log = logging.getLogger(__name__)


class LearnerRank:
    """Rank ``rank`` of a ``world_size``-rank learner; with the defaults, a whole learner in this process."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: LearnersConfig,
        *,
        beta: float,
        mu: float,
        dtype: str = "bfloat16",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        temperature: float = 1.0,
        sampler_logprobs: str = "raw",
        anchor: str = "ema",
    ) -> None:
        """``temperature``: the engines' sampling temperature, applied to every log-prob here (policy and
        anchor). ``sampler_logprobs``: what the rollouts' logprobs are (actors.logprobs: raw = at T = 1,
        processed = at T), so the drift metric compares like with like. ``anchor``: ``ema`` updates the
        anchor after every step, ``sft`` keeps it where load_init put it (classic RLHF's fixed reference)."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype = {dtype!r}: must be bfloat16 or float32")
        if beta < 0:
            raise ValueError(f"beta = {beta!r}: must be >= 0")
        if temperature <= 0 or sampler_logprobs not in ("raw", "processed"):
            raise ValueError(f"temperature = {temperature!r} must be > 0, sampler_logprobs = {sampler_logprobs!r} "
                             "raw or processed")  # fmt: skip
        if anchor not in ("ema", "sft"):
            raise ValueError(f"anchor = {anchor!r}: must be ema or sft")
        self.cfg, self.beta, self.dtype, self.ema_anchor = cfg, beta, dtype, anchor == "ema"
        self.temperature = temperature
        self.drift_temperature = 1.0 if sampler_logprobs == "raw" else temperature
        self.rank, self.world_size = rank, world_size
        self.master_addr, self.master_port = master_addr, master_port
        gpu = cfg.num_gpus > 0
        init_process_group(rank, world_size, master_addr, master_port, "nccl" if gpu else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        torch.manual_seed(seed)  # the same on every rank: nothing here may differ between replicas

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     attn_implementation=attention_for(self.device, dtype))  # fmt: skip
        self.pad_id = int(model.config.pad_token_id or 0)  # any id works: padding is masked out
        self.seed, self.lora = seed, cfg.lora.enabled
        if self.lora:  # only the adapter trains; the anchor is an adapter on the same frozen base
            model, anchor_model = lora.wrap(model, cfg.lora), None
        else:
            anchor_model = copy.deepcopy(model)  # before DeepSpeed partitions (ZeRO-3) or moves the policy
        ds_config = deepspeed_config(cfg, dtype, world_size)
        self.engine, *_ = deepspeed.initialize(
            model=model.to(self.device),
            optimizer=make_optimizer([p for p in model.parameters() if p.requires_grad], cfg),
            lr_scheduler=lambda opt: make_schedule(opt, cfg.warmup_steps),
            config=ds_config,
        )
        if world_size == 1 and cfg.zero_stage == 0:
            # Nothing to all-reduce, yet DeepSpeed would flatten every gradient into a bucket, "reduce" it over
            # one rank and copy it back after each backward: 1 s of a 9 s fp32 SmolLM2 step on two cores.
            # (ZeRO 1-2 partition gradients in the same call, so they keep it.)
            self.engine.enable_backward_allreduce = False
        if self.lora:
            self.anchor: EmaAnchor | PartitionedAnchor | lora.AdapterAnchor = lora.AdapterAnchor(
                self.engine.module, mu, fixed=anchor == "sft"
            )
        elif cfg.zero_stage == 3:  # 1/R of θ_ema per rank, partitioned exactly like the policy
            self.anchor = PartitionedAnchor(anchor_model.to(self.device), mu, ds_config)
        else:
            anchor_device = torch.device("cpu") if cfg.anchor_on_cpu else self.device
            self.anchor = EmaAnchor(anchor_model, mu, anchor_device)
        # fp32 without ZeRO is the one DeepSpeed mode that applies non-finite gradients: we check it.
        self._own_grad_check = dtype == "float32" and cfg.zero_stage == 0
        # DeepSpeed's FP16 optimizer (bf16 without ZeRO) builds Adam's state with one step on zero gradients: Adam
        # would count it, and its bias correction made the first real update 0.74 of the rate. Start at step 0.
        self._reset_optimizer()
        self.broadcaster = Broadcaster(rank)
        self._wide_init: Any = None  # θ_init wider than the frozen base (LoRA in bf16): name → tensor
        self.steps = 0  # step() calls, skipped ones included: the driver's t
        self.updates = 0  # optimizer updates applied since the last load_init
        self.version = 0  # weights version: the loaded init's version plus applied updates

    def ready(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------------
    # One step

    def step(self, rollouts: pa.Table) -> dict[str, Any]:
        """One REINFORCE update on a scored rollout table (this rank's share of the global batch).

        Metrics: reward, kl (mean log π − log π_ema), entropy (mean token entropy): means over this
        rank's sequences; loss: this rank's share of the global loss (shares add up); tokens:
        completion tokens here; grad_norm (global, before clipping), lr, step, sequences, seconds,
        skipped (true when a non-finite reward, loss or gradient left the weights as they were).
        """
        import torch

        start = time.perf_counter()
        self._lr = float(self.engine.get_lr()[0])  # the rate this update uses (the schedule moves after it)
        batch = self._tensors(rollouts)
        micro, intact = pack_micro_batches(batch["group_id"].cpu().numpy(), self.cfg.micro_batch_size)
        # Agreed before any forward: under ZeRO-3 every forward (anchor, pre-pass, training) gathers
        # parameters collectively, so every rank runs the same number of each, padding with dummies.
        reward_finite = bool(torch.isfinite(batch["reward"]).all())
        flags = [len(rollouts), len(micro), int(not reward_finite), int(not intact)]
        num_seqs, num_micro, num_bad, num_cut = agree(flags, self.world_size, self.device)
        padded = micro + [micro[0][:1]] * (num_micro - len(micro))  # dummies: results discarded
        clock = Phases.on(self.device)
        share = self.cfg.shares_prompts
        with clock("anchor"), torch.no_grad():
            anchor_logp = torch.cat(
                [self.anchor.sequence_logprobs(*self._inputs(batch, rows), self.temperature, share) for rows in padded][
                    : len(micro)
                ]
            )
        anchor_finite = bool(torch.isfinite(anchor_logp).all())
        (num_bad_anchor,) = agree_sum([float(not anchor_finite)], self.world_size, self.device)
        if num_bad or num_bad_anchor:
            return self._skip(start, "a non-finite reward or anchor log-probability", len(rollouts))
        prepass = num_cut > 0 or self.cfg.baseline == "mean"
        with clock("prepass"):
            adv = self._batch_advantages(batch, micro, padded, anchor_logp) if prepass else None
        sums = self._accumulate(batch, micro, padded, anchor_logp, adv, num_seqs, clock)
        with clock("optimizer"):
            applied, grad_norm = self._apply(loss_finite=math.isfinite(sums["loss"]))
        if not applied:
            return self._skip(start, "a non-finite loss or gradient", len(rollouts), grad_norm)
        with clock("ema"):
            if self.ema_anchor:
                self._update_anchor()
        self.updates += 1
        self.version += 1
        self.steps += 1
        n = len(rollouts)
        means = {k: sums[k] / n for k in ("reward", "kl", "entropy")}
        metrics = self._metrics(start, n, False, grad_norm, loss=sums["loss"], tokens=sums["tokens"], **means)
        return metrics | clock.seconds | {"drift_by_engine": sums["drift"]}

    def _update_anchor(self) -> None:
        """θ_ema follows the optimizer's fp32 masters (the weights themselves in fp32), as the saved policies do.

        Every rank calls it: under ZeRO 1-2 with R > 1 each master is assembled from the ranks' partitions.
        """
        module = self.engine.module
        if self.anchor.partitioned:
            self.anchor.update(module)  # shard by shard, from the local fp32 partitions
        elif self.dtype == "float32":
            self.anchor.update(lora.adapter_parameters(module) if self.lora else full_parameters(module))
        else:
            self.anchor.update(master_parameters(module, self.engine.optimizer, trainable_only=self.lora))

    def _tensors(self, rollouts: pa.Table) -> dict[str, torch.Tensor]:
        import torch

        if rollouts.column("reward").null_count:
            raise ValueError("rollouts have unscored rows (null reward); score them before the learner step")
        batch = to_tensors(rollouts, self.pad_id)
        batch["reward"] = torch.from_numpy(rollouts.column("reward").to_numpy().astype(np.float32))
        batch["group_id"] = torch.from_numpy(rollouts.column("group_id").to_numpy().copy())
        batch["engine"] = torch.from_numpy(rollouts.column("engine").to_numpy().astype(np.int64))
        return {k: v.to(self.device) for k, v in batch.items()}

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor], rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        index = torch_index(rows, batch["input_ids"].device)
        lengths = batch["attention_mask"][index].sum(-1)
        width = int(lengths.max())  # trim the padding the rest of the batch needed
        return tuple(batch[k][index, :width] for k in ("input_ids", "attention_mask", "completion_mask"))

    def _batch_advantages(self, batch, micro, padded, anchor_logp) -> torch.Tensor:
        """Advantages over the whole batch from a no-grad policy pass (batch-mean baseline, or split groups).

        The pass runs over ``padded`` (every rank the same count of forwards), keeping the real micro-batches.
        """
        import torch

        with torch.no_grad():
            share = self.cfg.shares_prompts
            outs = [
                sequence_logprobs_and_entropy(self.engine, *self._inputs(batch, r), self.temperature, None, share)[0]
                for r in padded
            ]
            logp = torch.cat(outs[: len(micro)])
        rows = torch_index(np.concatenate(micro), logp.device)
        r_beta = kl_shaped_reward(batch["reward"][rows], logp, anchor_logp, self.beta)  # (B,) in micro order
        if self.cfg.baseline == "mean":
            total, count = agree_sum([float(r_beta.sum()), float(len(r_beta))], self.world_size, self.device)
            adv_in_order = r_beta - total / count
        else:
            adv_in_order = advantages(r_beta, batch["group_id"][rows], self.cfg.baseline)
        adv = torch.empty_like(adv_in_order)
        adv[rows] = adv_in_order
        return adv

    def _accumulate(self, batch, micro, padded, anchor_logp, adv, num_seqs, clock: Phases) -> dict[str, float]:
        """Forward/backward every micro-batch of ``padded``, the same count on all ranks (dummies weigh 0)."""
        import torch

        sums = dict.fromkeys(("reward", "kl", "entropy", "loss"), 0.0) | {"tokens": 0.0}
        drift: dict[int, list[float]] = {}  # engine → [Σ |Δ log p|, tokens, max |Δ log p|]
        offset, share = 0, self.cfg.shares_prompts
        for i, rows in enumerate(padded):
            dummy = i >= len(micro)  # keeps ZeRO's per-backward collectives in step across ranks
            ids, attention, completion = self._inputs(batch, rows)
            self.engine.set_gradient_accumulation_boundary(i == len(padded) - 1)
            with clock("forward"):  # the policy's forward and the loss on it, as bench/learners.py's plain step
                logp, entropy, tokens = sequence_logprobs_and_entropy(
                    self.engine, ids, attention, completion, self.temperature, self.drift_temperature, share
                )  # (b,), (b,), (n,)
                index = torch_index(rows, logp.device)
                if dummy:
                    logp_anchor, adv_mb = logp.detach(), torch.zeros_like(logp)
                else:
                    logp_anchor = anchor_logp[offset : offset + len(rows)]  # anchor_logp is in micro-batch order
                    r_beta = kl_shaped_reward(batch["reward"][index], logp, logp_anchor, self.beta)  # (b,)
                    adv_mb = (advantages(r_beta, batch["group_id"][index], self.cfg.baseline) if adv is None
                              else adv[index])  # fmt: skip
                loss = reinforce_loss(logp, adv_mb, num_seqs)
            # DeepSpeed averages gradients over ranks; the loss is already a global mean, so undo that.
            with clock("backward"):
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if dummy:
                continue
            offset += len(rows)
            sums["loss"] += float(loss.detach())
            sums["reward"] += float(batch["reward"][index].sum())
            sums["kl"] += float((logp.detach() - logp_anchor).sum())
            sums["entropy"] += float(entropy.sum())
            sums["tokens"] += float(completion.sum())
            sampler = batch["sampler_logprobs"][index, : ids.shape[1]]  # (b, L) trimmed like ids
            add_drift(drift, tokens, sampler, completion, batch["engine"][index])
        sums["drift"] = drift
        return sums

    def _apply(self, loss_finite: bool) -> tuple[bool, float]:
        """Clip and step unless the loss or the gradient is non-finite on any rank; (applied, grad norm)."""
        import torch

        if self._own_grad_check:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
            finite = loss_finite and math.isfinite(grad_norm)
            (num_bad,) = agree_sum([float(not finite)], self.world_size, self.device)
            if num_bad:
                self.engine.zero_grad()
                return False, grad_norm
            self.engine.step()
            return True, grad_norm
        self.engine.step()  # DeepSpeed's bf16 and ZeRO optimizers skip (and clear) non-finite gradients
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        applied = self.engine.was_step_applied()
        (num_bad,) = agree_sum([float(not loss_finite)], self.world_size, self.device)
        if applied and num_bad:
            raise RuntimeError("DeepSpeed applied an update from a non-finite loss; the weights are corrupt")
        return applied, grad_norm

    def _skip(self, start: float, why: str, n: int, grad_norm: float = float("nan")) -> dict[str, Any]:
        log.warning("learner rank %d: step %d skipped: %s; weights unchanged", self.rank, self.steps, why)
        self.steps += 1
        nan = float("nan")
        return self._metrics(start, n, True, grad_norm, reward=nan, kl=nan, entropy=nan, loss=nan, tokens=0.0)

    def _metrics(self, start: float, n: int, skipped: bool, grad_norm: float, **values: float) -> dict[str, Any]:
        return dict(values, grad_norm=grad_norm, sequences=n, skipped=skipped, lr=self._lr, step=self.steps,
                    seconds=time.perf_counter() - start)  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    # Weights in and out

    def weights(self, version: int | None = None, master: bool = False) -> FlatWeights | None:
        """Full policy weights with HF names (tied lm_head left out), on rank 0; None elsewhere.

        In model dtype (what engines load), or with ``master`` the optimizer's fp32 master weights: the
        final policy the merger reads, so task vectors are not rounded to bf16 before SLERP. Every rank
        must call it: under ZeRO the parameters are gathered one tensor at a time.
        """
        from merger.flat import flatten

        module = self.engine.module
        # A gathered ZeRO-3 tensor does not outlive its turn in the loop, and on a GPU the assembled fp32 masters
        # (ZeRO 1-2) or merged LoRA weights would all be held there at once: those are copied out as they come.
        # The parameters themselves, on the CPU or a GPU, are copied once, straight into the flat host buffer
        # (on an H200 a separate .to("cpu") per tensor first made publishing 0.24 s of a 0.58 s SmolLM2 step).
        copy_out = zero3(module) or (self.device.type != "cpu" and (master or self.lora))
        pairs = self._policy(master)
        if self.rank != 0:
            for _ in pairs:
                pass
            return None
        named = ((name, t.detach().to("cpu", copy=True) if copy_out else t.detach()) for name, t in pairs)
        return flatten(named, version=self.version if version is None else version)

    def save_policy(self, out_dir: str | Path, reference_dir: str | Path, master: bool = True) -> str | None:
        """Write the policy as an HF checkpoint at ``out_dir`` (replacing it atomically), tensor by tensor as the
        parameters are read: no full copy of the model anywhere, and none through the driver. Every rank calls it
        (ZeRO gathers); rank 0 writes, and returns the directory. ``master``: the fp32 master weights (the final
        policy the merger reads), else the model dtype. Config and tokenizer files come from ``reference_dir``.
        """
        from learners.publish import param_specs
        from merger.checkpoint import CheckpointWriter

        pairs = self._policy(master)
        if self.rank != 0:
            for _ in pairs:
                pass
            return None
        layout = {
            spec.name: ("float32" if master else spec.dtype, spec.shape) for spec in param_specs(self.engine.module)
        }
        with CheckpointWriter(out_dir, layout, reference_dir, overwrite=True) as writer:
            for name, tensor in pairs:
                writer.write(name, tensor.detach().to("cpu"))  # a gathered ZeRO-3 tensor lives for this turn only
        return str(out_dir)

    def _policy(self, master: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of the policy: in model dtype, or with ``master`` in fp32 from the optimizer's
        master weights. A LoRA policy is merged, W_init + s·B·A, its sum formed in fp32."""
        import torch

        module, wide = self.engine.module, master and self.dtype != "float32"
        if self.lora:
            factors = dict(master_parameters(module, self.engine.optimizer, trainable_only=True)) if wide else None
            base = self._wide_init if wide else None  # θ_init itself, not the module's bf16 rounding of it
            return lora.merged_parameters(module, factors, torch.float32 if master else None, base)
        return master_parameters(module, self.engine.optimizer) if wide else full_parameters(module)

    def adapter(self, version: int | None = None, master: bool = False) -> AdapterWeights | None:
        """The LoRA adapter alone, as the engines load it (model dtype; ``master``: fp32), on rank 0; None
        elsewhere. Every rank must call it: the fp32 masters of a bf16 adapter are partitioned under ZeRO 1-2."""
        from actors.adapter import AdapterWeights
        from merger.flat import flatten

        if not self.lora:
            raise RuntimeError("adapter(): this learner trains the full model (learners.lora.rank = 0)")
        module = self.engine.module
        if master and self.dtype != "float32":
            # Collective under ZeRO 1-2 with R > 1 (each master is assembled from the ranks' partitions): every rank
            # runs it to the end. Rank 0 alone used to, and waited forever in the first all-reduce.
            pairs = master_parameters(module, self.engine.optimizer, trainable_only=True)
        else:
            pairs = lora.adapter_parameters(module)
        named = [(lora.saved_name(name), t.detach().to("cpu", copy=True)) for name, t in pairs]
        if self.rank != 0:
            return None
        flat = flatten(iter(named), version=self.version if version is None else version)
        settings = self.cfg.lora
        return AdapterWeights(flat, settings.rank, settings.alpha, settings.target_modules)

    def open_weight_sender(
        self, host: str, world_size: int, backend: str, bucket_bytes: int, timeout_s: float
    ) -> tuple[str, int, list]:
        """Rank 0: open the engines' broadcast group at ``host``, this node's address; (host, port, specs)."""
        return self.broadcaster.open(self.engine.module, host, world_size, backend, bucket_bytes, timeout_s)

    def connect_weight_sender(self) -> None:
        """Rank 0: block until every engine worker has joined the group."""
        self.broadcaster.connect()

    def broadcast_weights(self) -> int:
        """Stream the current weights to the engines (every rank calls it; rank 0 sends). Bytes sent."""
        return self.broadcaster.send(self._policy())

    def weight_sender_info(self) -> dict[str, Any]:
        return self.broadcaster.info()

    def load_init(self, weights: FlatWeights | str | Path, anchor: FlatWeights | str | Path | None = None) -> None:
        """θ ← θ_init and θ_ema ← θ_init (or ``anchor``: θ_sft for a fixed anchor); Adam moments and the
        warm-up restart, as a fresh run would. Weights are FlatWeights or an HF directory, read one tensor at a
        time (a run hands θ_init on as ``iter-<i>/init``: no rank holds a second model, none passes through Ray).

        Restarting the warm-up follows the paper: every run of every iteration starts from θ_init with
        a fresh optimizer, and a run without warm-up would take its first steps at full lr with empty
        moments.
        """
        import torch

        from merger.checkpoint import weight_source

        version = getattr(weights, "version", 0)  # a directory carries none: the driver tags versions itself
        source = weight_source(weights)
        if self.lora:  # the frozen base ← θ_init, a fresh adapter: B = 0, so the policy is θ_init exactly
            self._keep_wide_init(source)
            lora.load_base(self.engine.module, source.state_dict())
            # A's random init from (seed, version): the same on every rank, and on a re-run.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + version)
            lora.reset_adapter(self.engine.module, generator)
        else:
            state = self._matching(source.state_dict())
            with torch.no_grad():
                for name, param in full_parameters(self.engine.module, modify=True):
                    param.copy_(state[name])
        self._reset_optimizer()
        if self.lora:  # an EMA of the fresh factors; with anchor = sft the base itself (first iteration only)
            self.anchor.reset()
        else:
            # θ_init wider than the model (the merger's fp32 result): the masters, like the EMA's fp32
            # accumulators, get it exactly, not its rounding to the model dtype.
            load_master_parameters(self.engine.module, self.engine.optimizer, state)
            self.anchor.reset(state if anchor is None else self._matching(weight_source(anchor).state_dict()))
        self.updates = 0
        self.version = version

    def _keep_wide_init(self, source: FlatWeights | CheckpointState | None) -> None:
        """LoRA in bf16: keep θ_init when it is wider than the frozen base (the merger's fp32 result).

        The saved policy is then θ_init + s·B·A, and its task vector s·B·A exactly; from the bf16 base it would also
        carry θ_init's rounding, the same in every run, which SLERP would count as agreement between the runs. Nothing
        is copied: a directory's tensors are read when the policy is saved, FlatWeights' are views of its buffer.
        """
        wide = source is not None and self.dtype != "float32" and any(s.dtype == "float32" for s in source.specs)
        self._wide_init = source.state_dict() if wide else None

    def _matching(self, state: dict) -> dict:  # the policy's parameter names exactly, or KeyError
        names = {name for name, _ in self.engine.module.named_parameters()}
        if set(state) != names:
            missing, extra = sorted(names - set(state)), sorted(set(state) - names)
            raise KeyError(f"load_init: weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        return state

    def _reset_optimizer(self) -> None:
        import torch

        if hasattr(self.engine.optimizer, "refresh_fp32_params"):
            self.engine.optimizer.refresh_fp32_params()  # the fp32 master copy follows the new weights

        for moments in self.engine.basic_optimizer.state.values():
            for value in moments.values():
                if torch.is_tensor(value):
                    value.zero_()  # in place: ZeRO keeps references to these tensors
        schedule = self.engine.lr_scheduler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            schedule.last_epoch = -1
            schedule.step()

    # ------------------------------------------------------------------------------------------------
    # Resume

    def save_state(self, directory: str | Path) -> None:
        """Everything resume needs (:mod:`learners.state`). Every rank calls it with the same directory."""
        counters = {"steps": self.steps, "updates": self.updates, "version": self.version}
        save_rank_state(directory, self.engine, self.anchor, self.rank, counters)
        barrier(self.world_size)

    def load_state(self, directory: str | Path, init: FlatWeights | str | Path | None = None) -> None:
        """Continue exactly where save_state left off (same ranks, same ZeRO stage); ``init``: the iteration's
        θ_init, which a LoRA learner's saved policy is formed on (the checkpoint holds only its rounding; None keeps
        the one load_init gave)."""
        if self.lora and init is not None:
            from merger.checkpoint import weight_source

            self._keep_wide_init(weight_source(init))
        counters = load_rank_state(directory, self.engine, self.anchor, self.rank)
        self.steps, self.updates, self.version = counters["steps"], counters["updates"], counters["version"]

    def shutdown(self) -> None:
        """Release the engine; the process group stays (it belongs to the process, and may be shared)."""
        self.broadcaster.close()
        if self.anchor.partitioned:
            self.anchor.engine.destroy()
        self.engine.destroy()


def torch_index(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    return torch.as_tensor(rows, dtype=torch.int64, device=device)
