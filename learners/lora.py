"""LoRA learners: a peft adapter on the frozen θ_init, the policy's full weights from it, and its EMA anchor.

A run with ``learners.lora.rank`` > 0 trains only the adapter: each target linear layer's weight is
W = W_init + s·B·A with s = α / r, A (r, in) and B (out, r); B starts at zero, so every run of every
iteration starts exactly at θ_init. The rest of the system sees full weights with HF names, as for full
fine-tuning: :func:`merged_parameters` forms W per target matrix (engines sample with it, the merger
takes the task vector δ = s·B·A from it, `save_hf` writes it).

The anchor is θ_init plus an EMA *of the factors*: Ā ← (1 − μ)Ā + μA and B̄ likewise, scored as
W_init + s·B̄·Ā. That is not θ_init + EMA(s·B·A), the EMA of the products: the two differ by the
factors' co-movement (Σ_t w_t (B_t − B̄)(A_t − Ā)), second order in the steps' size. We keep the
factors because the anchor is then one more adapter on the policy's own frozen base: no second copy
of the model, and the anchor's forward is the policy's with other factors swapped in. EMA(B·A) would
need a dense fp32 matrix per target, the memory LoRA is chosen to save. ``tests/learners/test_lora.py``
checks the rule and how far apart the two are.

Imports torch; peft lazily; never Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from learners.anchor import EmaAnchor, _check_mu, held_bytes
from learners.objective import sequence_logprobs

if TYPE_CHECKING:
    from warp_rlhf.config import LoraConfig

ADAPTER = "default"  # peft's name for a model's single adapter
_PREFIX = "base_model.model."  # what peft puts before every HF parameter name


def wrap(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """The HF causal LM with a fresh adapter on ``cfg.target_modules``; only the adapter is trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                              lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    wrapped = get_peft_model(model, peft_cfg)
    for name, layer in lora_layers(wrapped).items():
        # An embedding keeps its factors elsewhere; a GPT-2 style Conv1D stores W transposed (fan_in_fan_out).
        if ADAPTER not in layer.lora_A or getattr(layer, "fan_in_fan_out", False):
            kind = type(layer.get_base_layer()).__name__
            raise ValueError(f"learners.lora.target_modules: {hf_name(name)!r} is not a torch.nn.Linear layer "
                             f"({kind}); LoRA WARP adapts linear layers only")  # fmt: skip
    return wrapped


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def hf_name(name: str) -> str:
    """peft's parameter name → the HF checkpoint's (``…q_proj.base_layer.weight`` → ``…q_proj.weight``)."""
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".")


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapter_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(peft name, parameter) of every A and B factor, in the model's order."""
    return ((name, p) for name, p in model.named_parameters() if is_adapter(name))


def saved_name(name: str) -> str:
    """peft's parameter name → the name ``save_pretrained`` writes (the adapter's own name dropped)."""
    return name.replace(f".{ADAPTER}.", ".")


def merged_parameters(
    model: torch.nn.Module,
    factors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full weight) of the policy: W_init + s·B·A for targets, the frozen weight elsewhere.

    ``factors`` (peft name → tensor) replace the module's own A and B (the optimizer's fp32 masters of
    a bf16 model); ``base`` (HF name → tensor) replaces the module's frozen weights (θ_init as the merger
    wrote it, fp32, where the module holds its bf16 rounding); ``dtype`` is the dtype of every weight yielded
    (default: the base weights'). The sum is formed in fp32; untouched weights in their own dtype are yielded
    as they are (zero-copy).
    """
    layers = lora_layers(model)
    for name, param in model.named_parameters():
        if is_adapter(name):
            continue
        frozen = param.data if base is None else base[hf_name(name)].to(param.device)
        if not name.endswith(".base_layer.weight"):
            yield hf_name(name), frozen if dtype is None else frozen.to(dtype)
            continue
        layer_name = name.removesuffix(".base_layer.weight")
        layer = layers[layer_name]
        a_name, b_name = f"{layer_name}.lora_A.{ADAPTER}.weight", f"{layer_name}.lora_B.{ADAPTER}.weight"
        a = factors[a_name] if factors is not None else layer.lora_A[ADAPTER].weight.data
        b = factors[b_name] if factors is not None else layer.lora_B[ADAPTER].weight.data
        merged = torch.addmm(frozen.float(), b.float(), a.float(), alpha=layer.scaling[ADAPTER])
        yield hf_name(name), merged.to(dtype or param.dtype)


def load_base(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Frozen weights ← ``state`` (HF names, every one of them); the adapter is left as it is."""
    own = {hf_name(name): p for name, p in model.named_parameters() if not is_adapter(name)}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise KeyError(f"load_init: weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name])


def reset_adapter(model: torch.nn.Module, generator: torch.Generator) -> None:
    """A ← peft's default init (Kaiming-uniform, a = √5) drawn from ``generator``, B ← 0: the policy is θ_init."""
    import math

    with torch.no_grad():
        for layer in lora_layers(model).values():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            fresh = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a.copy_(fresh)
            b.zero_()


class AdapterAnchor(EmaAnchor):
    """θ_ema = θ_init + s·B̄·Ā: fp32 EMAs of the policy's factors, swapped into the policy to score.

    :class:`learners.anchor.EmaAnchor` over the adapter's factors alone, with its own fp32 copies (the
    policy's factors keep training). Every rank holds the whole (tiny) adapter: ZeRO 0-2 keep parameters
    whole, and the update reads this rank's own copy of the factors.
    """

    def __init__(self, policy: torch.nn.Module, mu: float, fixed: bool = False) -> None:
        """``policy``: the wrapped model the learner trains; ``fixed``: the anchor is θ_init itself (no EMA)."""
        _check_mu(mu)
        self.policy, self.mu, self.fixed = policy, mu, fixed
        self.params = dict(adapter_parameters(policy))
        self.ema = {name: p.data.detach().float().clone() for name, p in self.params.items()}
        self._rounded: list[str] = []  # nothing to round: the factors are swapped in only to score
        self.updates = 0

    def reset(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """θ_ema ← θ_init: the factors as the policy holds them now (A random, B = 0), or the given ones."""
        super().reset(named_tensors if named_tensors is not None else ((n, p.data) for n, p in self.params.items()))

    def update(self, policy: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """Ā ← (1 − μ)Ā + μA and B̄ likewise, from ``policy``'s (peft name, factor) pairs (the optimizer's fp32
        masters of a bf16 adapter) or, without it, the module's own factors."""
        super().update(policy if policy is not None else ((name, p.data) for name, p in self.params.items()))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The policy module holds the anchor's factors (rounded to the model dtype) inside the block."""
        if self.fixed:  # θ_init: the adapter switched off
            with self.policy.disable_adapter():
                yield
            return
        saved = {name: p.data.clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.data.copy_(self.ema[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.data.copy_(saved[name])

    def sequence_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        completion_mask: torch.Tensor,  # (B, L)
        temperature: float = 1.0,
        share_prompts: bool = True,
    ) -> torch.Tensor:
        """log π_ema(y|x) (B,): the policy's forward with the anchor's factors."""
        with torch.no_grad(), self.swapped_in():
            return sequence_logprobs(
                self.policy, input_ids, attention_mask, completion_mask, temperature, share_prompts
            )

    def local_bytes(self) -> int:
        """The fp32 factor EMAs: the anchor's only memory (its base is the policy's)."""
        return held_bytes(list(self.ema.values()))
