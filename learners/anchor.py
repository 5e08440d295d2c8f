"""The EMA anchor θ_ema of one RL run: its update rule, its log-probabilities, its reset and its state.

Owns a plain (non-DeepSpeed) copy of the policy module and an fp32 accumulator per parameter. The
accumulator is fp32 whatever the model dtype: with μ = 0.01 and lr = 1e-6, μ(θ − θ_ema) is far below
bf16's resolution and a bf16 EMA would never move. The module the anchor scores with holds the
accumulator cast to the model dtype (for fp32 models it *is* the accumulator, no second copy).
The learner feeds it full (gathered) policy parameters, so ZeRO partitioning never reaches here.
Imports torch only; never DeepSpeed, Ray or vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from learners.objective import sequence_logprobs


@torch.no_grad()
def ema_update_(ema: torch.Tensor, param: torch.Tensor, mu: float) -> None:
    """θ_ema ← (1 − μ) θ_ema + μ θ, in place; ``param`` may be another dtype or device."""
    ema.lerp_(param.to(device=ema.device, dtype=ema.dtype), mu)


class EmaAnchor:
    """θ_ema as a frozen module plus fp32 accumulators keyed by HF parameter name."""

    def __init__(self, module: torch.nn.Module, mu: float, device: torch.device | str = "cpu") -> None:
        if not 0 < mu <= 1:
            raise ValueError(f"EMA rate mu = {mu!r}: must be in (0, 1]")
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
    def reset(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """θ_ema ← θ_init (every name of the anchor must be given once)."""
        seen = set()
        for name, tensor in named_tensors:
            self.ema[name].copy_(tensor)
            seen.add(name)
        missing = set(self.ema) - seen
        if missing:
            raise KeyError(f"anchor reset is missing {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self._sync_module()
        self.updates = 0

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One EMA step towards the policy's current full parameters (call after every optimizer step)."""
        for name, param in named_params:
            ema_update_(self.ema[name], param, self.mu)
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
    ) -> torch.Tensor:
        """log π_ema(y|x) summed over completion tokens (B,), on the caller's device."""
        out_device = input_ids.device
        batch = (t.to(self.device) for t in (input_ids, attention_mask, completion_mask))
        return sequence_logprobs(self.module, *batch).to(out_device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int = 0) -> None:
        self.reset(state.items())
        self.updates = updates
