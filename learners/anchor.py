"""The EMA anchor θ_ema of one RL run: its update rule, its log-probabilities, its reset and its state.

Two layouts, one interface (``reset``, ``update``, ``sequence_logprobs``, ``state_dict``,
``load_state_dict``, ``local_bytes``, ``gathered``):

- :class:`EmaAnchor` (ZeRO 0-2): a plain full copy of the policy module on every rank, plus an fp32
  accumulator per parameter, updated from the policy's full parameters.
- :class:`PartitionedAnchor` (ZeRO-3): an inference-only DeepSpeed ZeRO-3 module partitioned exactly
  like the policy, so each rank holds 1/R of θ_ema (its fp32 accumulator shard plus the model-dtype
  shard the forward gathers layer by layer). The update is elementwise on local shards: no gather.

The accumulator is fp32 whatever the model dtype: with μ = 0.01 and lr = 1e-6, μ(θ − θ_ema) is far below
bf16's resolution and a bf16 EMA would never move. The module the anchor scores with holds the
accumulator rounded to the model dtype (for fp32 models it *is* the accumulator, no second copy).
Imports torch; deepspeed only inside the partitioned anchor; never Ray or vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from learners.objective import sequence_logprobs


@torch.no_grad()
def ema_update_(ema: torch.Tensor, param: torch.Tensor, mu: float) -> None:
    """θ_ema ← (1 − μ) θ_ema + μ θ, in place; ``param`` may be another dtype or device."""
    ema.lerp_(param.to(device=ema.device, dtype=ema.dtype), mu)


def _check_mu(mu: float) -> None:
    if not 0 < mu <= 1:
        raise ValueError(f"EMA rate mu = {mu!r}: must be in (0, 1]")


class EmaAnchor:
    """θ_ema as a frozen full module plus fp32 accumulators keyed by HF parameter name."""

    partitioned = False  # every rank holds all of it

    def __init__(self, module: torch.nn.Module, mu: float, device: torch.device | str = "cpu") -> None:
        _check_mu(mu)
        self.mu = mu
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self.params = dict(self.module.named_parameters())  # tied weights appear once
        self.ema: dict[str, torch.Tensor] = {
            name: p.data if p.dtype == torch.float32 else p.data.float() for name, p in self.params.items()
        }
        # fp32 models score with the accumulator itself; others keep a rounded copy in the module.
        self._rounded = [name for name, p in self.params.items() if p.dtype != torch.float32]
        self.updates = 0

    @torch.no_grad()
    def reset(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """θ_ema ← θ_init (every name of the anchor must be given once), from (name, tensor) pairs or a mapping."""
        seen = set()
        pairs = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        for name, tensor in pairs:
            self.ema[name].copy_(tensor)
            seen.add(name)
        _check_complete(self.ema, seen)
        self._sync_module()
        self.updates = 0

    @torch.no_grad()
    def update(self, policy: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One EMA step towards the policy (call after every optimizer step).

        ``policy``: (name, full tensor) pairs, every name of the anchor once: the optimizer's fp32 master weights
        where the model is narrower (``learners.distributed.master_parameters``), so the EMA follows what the
        optimizer holds, not its rounding to bf16 (with μ = 0.01, lr = 1e-6, most steps would not move it).
        """
        seen = set()
        for name, param in policy:
            ema_update_(self.ema[name], param, self.mu)
            seen.add(name)
        _check_complete(self.ema, seen)
        self._sync_module()
        self.updates += 1

    def _sync_module(self) -> None:
        for name in self._rounded:
            self.params[name].data.copy_(self.ema[name])  # fp32 → model dtype, rounding once per step

    @torch.no_grad()
    def sequence_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        completion_mask: torch.Tensor,  # (B, L)
        temperature: float = 1.0,
        share_prompts: bool = True,
    ) -> torch.Tensor:
        """log π_ema(y|x) at the sampling temperature, summed over completion tokens (B,), on the caller's device."""
        out_device = input_ids.device
        batch = (t.to(self.device) for t in (input_ids, attention_mask, completion_mask))
        return sequence_logprobs(self.module, *batch, temperature, share_prompts).to(out_device)

    def local_bytes(self) -> int:
        """Bytes of every tensor this rank holds for the anchor (module copy and accumulators, once each)."""
        return held_bytes([*self.ema.values(), *(p.data for p in self.params.values())])

    def gathered(self) -> dict[str, torch.Tensor]:
        """The full fp32 θ_ema (here: the accumulators themselves, on CPU)."""
        return self.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int = 0) -> None:
        self.reset(state.items())
        self.updates = updates


class PartitionedAnchor:
    """θ_ema as an inference-only DeepSpeed ZeRO-3 module, partitioned like the policy; fp32 shards alongside.

    ``module`` is a fresh copy of the policy's architecture (its weights are replaced by ``reset``);
    ``ds_config`` is the policy's ZeRO-3 config, used without an optimizer. Every rank of the learner
    must call ``sequence_logprobs``, ``reset``, ``gathered`` the same number of times: they gather.
    ``update``, ``state_dict`` and ``load_state_dict`` are local to the rank.
    """

    partitioned = True  # each rank holds its shard

    def __init__(self, module: torch.nn.Module, mu: float, ds_config: dict[str, Any]) -> None:
        import deepspeed

        _check_mu(mu)
        self.mu = mu
        module.eval().requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=module, config=ds_config)
        self.module = self.engine.module
        self.params = dict(self.module.named_parameters())
        # The local partition of each parameter, flat (ceil(numel / R),), and its fp32 accumulator.
        self.ema: dict[str, torch.Tensor] = {
            name: p.ds_tensor.data if p.dtype == torch.float32 else p.ds_tensor.data.float()
            for name, p in self.params.items()
        }
        self._rounded = [name for name, p in self.params.items() if p.dtype != torch.float32]
        self.device = next(iter(self.ema.values())).device
        self.updates = 0

    @torch.no_grad()
    def reset(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """θ_ema ← θ_init from full tensors; collective (each parameter is gathered, written, re-partitioned).

        A mapping is read one tensor at a time (a checkpoint directory's ``CheckpointState``): never whole."""
        import deepspeed

        given = named_tensors if isinstance(named_tensors, Mapping) else dict(named_tensors)
        _check_complete(self.ema, set(given))
        for name, param in self.params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(given[name])  # rank 0's copy is kept and scattered on exit
            self.ema[name].copy_(param.ds_tensor.data)
        self.updates = 0

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        """One EMA step on this rank's shards only, from the policy's fp32 master partitions (same R, shapes)."""
        from learners.distributed import local_master_shards

        for (name, param), (policy_name, master) in zip(self.params.items(), local_master_shards(policy), strict=True):
            if name != policy_name or param.ds_tensor.numel() != master.numel():
                raise RuntimeError(f"anchor parameter {name!r} is not partitioned like the policy's {policy_name!r}")
            ema_update_(self.ema[name], master, self.mu)
        self._publish_shards()
        self.updates += 1

    def _publish_shards(self) -> None:
        """The shards were written: make the module's forward read them.

        A parameter below ZeRO-3's persistence threshold (every norm weight of a 7B model; at DeepSpeed's default
        1e5, every tensor of a tiny one) stays gathered after its first forward, and DeepSpeed re-gathers it only
        after an optimizer step, which this inference-only module never takes: its forward would go on reading
        θ_init. Partitioning it again drops the stale full copy (local: no collective); the next forward gathers
        the new shards, in the same collective every rank makes.
        """
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for name in self._rounded:
            self.params[name].ds_tensor.data.copy_(self.ema[name])
        held = [p for p in self.params.values() if p.ds_status == ZeroParamStatus.AVAILABLE]
        if held:
            held[0].partition(param_list=held, has_been_updated=False)

    @torch.no_grad()
    def sequence_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        completion_mask: torch.Tensor,  # (B, L)
        temperature: float = 1.0,
        share_prompts: bool = True,
    ) -> torch.Tensor:
        """log π_ema(y|x) (B,); ZeRO-3 gathers each layer's parameters for the forward and releases them."""
        return sequence_logprobs(self.engine, input_ids, attention_mask, completion_mask, temperature, share_prompts)

    def local_bytes(self) -> int:
        return held_bytes([*self.ema.values(), *(p.ds_tensor.data for p in self.params.values())])

    @torch.no_grad()
    def gathered(self) -> dict[str, torch.Tensor]:
        """The full fp32 θ_ema on CPU, assembled from every rank's shards (collective; tests and debugging)."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        full = {}
        for name, param in self.params.items():
            shard = self.ema[name].float().contiguous()
            parts = [torch.empty_like(shard) for _ in range(world)]
            if world > 1:
                dist.all_gather(parts, shard)
            else:
                parts = [shard]
            full[name] = torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()
        return full

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 shards (resume needs the same ranks and ZeRO stage, as DeepSpeed's checkpoint does)."""
        return {name: t.detach().float().cpu() for name, t in self.ema.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int = 0) -> None:
        _check_complete(self.ema, set(state))
        for name, shard in state.items():
            if shard.numel() != self.ema[name].numel():
                raise ValueError(f"anchor shard {name!r} has {shard.numel()} elements, this rank holds "
                                 f"{self.ema[name].numel()}: resume needs the same learner ranks")  # fmt: skip
            self.ema[name].copy_(shard)
        self._publish_shards()
        self.updates = updates


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (an fp32 accumulator *is* the fp32 weight)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _check_complete(expected: dict[str, torch.Tensor], given: set[str]) -> None:
    missing = set(expected) - given
    if missing:
        raise KeyError(f"anchor is missing {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
