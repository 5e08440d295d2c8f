"""The REINFORCE objective on the KL-shaped reward, as small pure functions on tensors.

Owns: sequence log-probabilities under teacher forcing, the shaped reward r − β(log π − log π_ema),
the baselines (rloo, mean, none) and the loss. Imports torch only; never DeepSpeed, Ray or vLLM, so
every function here is testable on a toy module in-process.

The KL term always uses log-probabilities the learner computes itself for both the policy and its
EMA anchor; the sampler's logprobs differ numerically (other kernels, other dtype) and are never used
in the loss, only compared (the drift metric). Both are of the *sampling* distribution: the logits are
divided by the sampling temperature, as in verl, OpenRLHF and TRL, so the REINFORCE gradient and the
KL are those of the distribution that produced y. Top-k truncation is not applied (see the README):
a token outside the anchor's top-k would make log π_ema = −∞.
"""

from __future__ import annotations

from typing import Literal

import torch

from learners.prefix import SharedPrompts, head_on_positions, partitioned

Baseline = Literal["rloo", "mean", "none"]


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log p of each target token under softmax(logits / T) and that distribution's entropy, in fp32.

    logits (N, V), targets (N,) → (logp (N,), entropy (N,)); entropy is detached (a metric, never a loss).
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    logprobs = torch.log_softmax(scaled, dim=-1)  # (N, V)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # (N,)
    return logp, entropy


def sequence_logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, L) prompt + completion, right-padded
    attention_mask: torch.Tensor,  # (B, L) 1 on real tokens
    completion_mask: torch.Tensor,  # (B, L) true on completion tokens
    temperature: float = 1.0,
    token_temperature: float | None = None,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log π_T(y|x) summed over completion tokens (B,), mean token entropy (B,), per-token log-probs (N,)).

    π_T = softmax(logits / ``temperature``). Teacher forcing: the logits at position t-1 score the token
    at t. Only completion positions go through the output head and the log-softmax: prompt and padding
    positions would be vocabulary-wide work thrown away. With ``share_prompts``, rows that repeat a prompt
    (an RLOO group) compute it once (``learners.prefix``). With ``token_temperature``, also the detached
    log-prob of every completion token (row-major, the order of ``completion_mask``) at that temperature,
    for comparing with the sampler's own; else None.
    """
    layout = (input_ids, attention_mask, completion_mask)
    shared = SharedPrompts.of(*layout, always=partitioned(model)) if share_prompts else None
    if shared is None:
        scored = completion_mask[:, 1:].bool()  # (B, L-1): a completion token is never at position 0
        with head_on_positions(model, torch.nn.functional.pad(scored, (0, 1))):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, V)
        parts = [(logits, input_ids[:, 1:][scored], torch.nonzero(scored, as_tuple=True)[0])]
        order = None
    else:
        parts, order = shared.token_logits(model)
    per_part = [token_logprobs(logits, targets, temperature) for logits, targets, _ in parts]
    logp = torch.cat([lp for lp, _ in per_part])  # (N,)
    entropy = torch.cat([e for _, e in per_part])  # (N,)
    rows = torch.cat([r for _, _, r in parts])  # (N,) which sequence each scored token belongs to
    tokens = None
    if token_temperature is not None:
        with torch.no_grad():
            if token_temperature == temperature:
                tokens = logp.detach()
            else:
                tokens = torch.cat([token_logprobs(lg, t, token_temperature)[0] for lg, t, _ in parts])
            tokens = tokens if order is None else tokens[order]
    batch = input_ids.shape[0]
    seq_logp = torch.zeros(batch, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)  # (B,)
    lengths = completion_mask.sum(-1).clamp(min=1).to(logp.dtype)  # (B,)
    entropy_sum = torch.zeros(batch, dtype=logp.dtype, device=logp.device).index_add(0, rows, entropy)  # (B,)
    return seq_logp, entropy_sum / lengths, tokens


def attention_for(device: torch.device, dtype: str) -> str:
    """The attention kernel of the learner's models (policy, anchor): PyTorch's SDPA, except for bf16 on CPU,
    where transformers' eager attention is faster.

    Measured on SmolLM2-135M at the demo's shapes (32 sequences of ≈ 10 prompt + 16 completion tokens; a plain
    step: anchor forward, forward, backward, AdamW, EMA) on a 2-core AMD EPYC Zen 4 with avx512_bf16:
    bf16 on one thread (a demo learner) eager 7.05 s against SDPA 7.37 (SDPA's CPU flash kernel has the
    slower backward, 3.5 s against 2.85), on two threads 6.05 against 5.49, within the noise; fp32 on one
    thread SDPA 15.1 s against eager 16.4, on two threads 8.6 against 10.3 (eager's forward with autograd
    recording costs 1 s more than SDPA's). Eager materialises the (B, heads, L, L) scores, nothing at these
    lengths; on accelerators SDPA's fused kernels are the right choice.
    """
    return "eager" if device.type == "cpu" and dtype == "bfloat16" else "sdpa"


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    completion_mask: torch.Tensor,  # (B, L)
    temperature: float = 1.0,
    share_prompts: bool = True,
) -> torch.Tensor:
    """log π_T(y|x) = Σ_t log π_T(y_t | x, y_<t) over completion tokens, under teacher forcing. (B,)"""
    args = (model, input_ids, attention_mask, completion_mask, temperature)
    return sequence_logprobs_and_entropy(*args, share_prompts=share_prompts)[0]


def kl_shaped_reward(
    reward: torch.Tensor,  # (B,) r(x, y)
    logp: torch.Tensor,  # (B,) log π_θ(y|x)
    logp_anchor: torch.Tensor,  # (B,) log π_ema(y|x)
    beta: float,
) -> torch.Tensor:
    """r_β = r − β (log π − log π_ema) per sequence (B,); both log-probs are detached (it is a reward)."""
    return reward - beta * (logp.detach() - logp_anchor.detach())


def advantages(r_beta: torch.Tensor, group_ids: torch.Tensor, baseline: Baseline = "rloo") -> torch.Tensor:
    """r_β minus a baseline (B,).

    rloo: the mean r_β of the other samples of the same prompt (leave-one-out); every group needs at
    least two samples. mean: the batch mean. none: r_β itself.
    """
    r_beta = r_beta.detach()
    if baseline == "none":
        return r_beta
    if baseline == "mean":
        return r_beta - r_beta.mean()
    if baseline != "rloo":
        raise ValueError(f"baseline = {baseline!r}: must be rloo, mean or none")
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)  # (B,), (G,)
    if bool((counts < 2).any()):
        lonely = torch.unique(group_ids)[counts < 2].tolist()
        raise ValueError(
            f"baseline rloo needs at least 2 samples per prompt; group_id(s) {lonely[:5]} have 1 "
            "(raise actors.samples_per_prompt or use learners.baseline = mean)"
        )
    sums = torch.zeros(len(counts), dtype=r_beta.dtype, device=r_beta.device).index_add_(0, index, r_beta)  # (G,)
    n = counts[index].to(r_beta.dtype)  # (B,)
    leave_one_out = (sums[index] - r_beta) / (n - 1)  # (B,)
    return r_beta - leave_one_out


def reinforce_loss(logp: torch.Tensor, adv: torch.Tensor, num_sequences: int | None = None) -> torch.Tensor:
    """−Σ A·log π / N: the REINFORCE surrogate, normalised by the number of sequences N.

    logp (B,) carries the gradient, adv (B,) is a constant. N defaults to B; a micro-batch of a larger
    batch passes the whole batch's N so that accumulated gradients equal the full batch's.
    """
    n = logp.shape[0] if num_sequences is None else num_sequences
    return -(adv.detach() * logp).sum() / n


def add_drift(
    drift: dict[int, list[float]],
    learner: torch.Tensor,  # (n,) the learner's log-prob of each completion token
    sampler: torch.Tensor,  # (b, L) the sampler's, at completion positions
    completion: torch.Tensor,  # (b, L)
    engines: torch.Tensor,  # (b,) which engine sampled each row
) -> None:
    """Accumulate |learner − sampler| per token into engine → [sum, count, max]: the weight-sync health check."""
    scored = completion[:, 1:].bool()  # (b, L-1), the order of ``learner``
    delta = (learner - sampler[:, 1:][scored]).abs()  # (n,)
    token_engine = engines[torch.nonzero(scored, as_tuple=True)[0]]  # (n,)
    for engine in torch.unique(token_engine).tolist():
        mine = delta[token_engine == engine]
        entry = drift.setdefault(int(engine), [0.0, 0.0, 0.0])
        entry[0] += float(mine.sum())
        entry[1] += float(mine.numel())
        entry[2] = max(entry[2], float(mine.max()))
