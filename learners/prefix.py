"""Each prompt computed once per micro-batch: the shared-prompt forward of teacher forcing.

An RLOO group is one prompt sampled k times, so a micro-batch of whole groups holds every prompt k times.
The plain forward runs the model over each row's prompt + completion; this one runs each distinct prompt
once, keeps its key/value cache, selects that cache for every row of the prompt and runs only the
completions on it. Attention sees the same keys and values and RoPE the same positions, so the log-probs
are the plain forward's up to float reassociation, and gradients flow back through the selected cache into
the one prompt forward. What it saves is the prompt's positions times k − 1 in every layer: at the
demo's shapes (k = 4, prompts ≈ 10 tokens, 16 new) about a third of the positions, but on a 2-core CPU
little time, as the prompt pass is a small matmul and every layer runs twice (bench.learners --unshared:
0.81× in fp32, none in bf16); with 64-token prompts the learner step takes half the time, and the long
prompts of real RLHF data save most of their positions.

Owns only the layout and the two forwards; imports torch and transformers' cache through the model's
own ``use_cache`` path, so it works for any Hugging Face causal LM, under a DeepSpeed engine or a peft
wrapper, whose forward takes ``past_key_values`` and ``position_ids``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrompts:
    """A right-padded micro-batch (B, L) of prompt + completion rows, split into P distinct prompts and B completions.

    prompt_ids, prompt_mask (P, Lp): the distinct prompts, right-padded; prompt_of_row (B,): which prompt
    each row continues; completion_ids, completion_mask (B, Lc): the completions, right-padded.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_of_row: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def of(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, always: bool = False
    ) -> SharedPrompts | None:
        """The layout of a batch as ``actors.rollout.to_tensors`` builds it (every prompt non-empty), or None
        when no prompt repeats: then two passes over the same positions only cost more than one (1.2× in fp32
        at the demo's shapes). With ``always``, the layout even then: under ZeRO-3 every forward gathers the
        parameters collectively, so all ranks must run the same number of forwards whatever their rows.
        """
        completion = completion_mask.bool()
        prompt_len = (attention_mask.bool() & ~completion).sum(-1)  # (B,): the prompt comes first in a row
        if int(prompt_len.min()) == 0:
            raise ValueError("a row has an empty prompt: its first completion token has no position to be scored at")
        distinct: dict[tuple[int, ...], int] = {}
        rows = input_ids.tolist()
        of_row = [
            distinct.setdefault(tuple(r[:n]), len(distinct)) for r, n in zip(rows, prompt_len.tolist(), strict=True)
        ]
        if len(distinct) == len(rows) and not always:
            return None
        device = input_ids.device
        prompts = list(distinct)  # in order of first appearance, index = value
        width = max(len(p) for p in prompts)
        prompt_ids = torch.zeros(len(prompts), width, dtype=input_ids.dtype)
        prompt_mask = torch.zeros(len(prompts), width, dtype=attention_mask.dtype)
        for j, p in enumerate(prompts):
            prompt_ids[j, : len(p)] = torch.tensor(p, dtype=input_ids.dtype)
            prompt_mask[j, : len(p)] = 1
        completion_len = completion.sum(-1)  # (B,)
        cols = torch.arange(max(int(completion_len.max()), 1), device=device)  # (Lc,)
        real = cols < completion_len[:, None]  # (B, Lc)
        source = (prompt_len[:, None] + cols).clamp(max=input_ids.shape[1] - 1)  # (B, Lc)
        return cls(
            prompt_ids=prompt_ids.to(device),
            prompt_mask=prompt_mask.to(device),
            prompt_of_row=torch.tensor(of_row, device=device),
            completion_ids=torch.where(real, input_ids.gather(1, source), 0),
            completion_mask=real,
        )

    def token_logits(self, model: torch.nn.Module) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
        """([(logits (n, V), targets (n,), rows (n,)) per part], order (N,)) for every completion token: the
        logits that score token t come from position t-1, as in the plain forward. Two parts: the rows' first
        tokens (scored by the prompt forward), then the rest; ``order`` indexes the parts' concatenation into
        row-major order. Only per-token results are permuted: concatenating (N, V) logits costs a copy each way.
        """
        prompt_len = self.prompt_mask.sum(-1)  # (P,)
        last = torch.zeros_like(self.prompt_mask, dtype=torch.bool)  # (P, Lp)
        last[torch.arange(len(last), device=last.device), prompt_len - 1] = True
        with head_on_positions(model, last):  # a prompt's last position scores its rows' first tokens
            out = model(input_ids=self.prompt_ids, attention_mask=self.prompt_mask, use_cache=True)
        first_logits, cache = out.logits, out.past_key_values  # (P, V)
        cache.batch_select_indices(self.prompt_of_row)  # (P, …) → (B, …); differentiable indexing
        of_row = self.prompt_of_row
        width = self.completion_ids.shape[1]
        positions = prompt_len[of_row][:, None] + torch.arange(width, device=of_row.device)  # (B, Lc)
        mask = torch.cat([self.prompt_mask[of_row], self.completion_mask.to(self.prompt_mask.dtype)], dim=1)
        scored = torch.nn.functional.pad(self.completion_mask[:, 1:], (0, 1))  # (B, Lc): position t scores t+1
        with head_on_positions(model, scored):
            rest_logits = model(
                input_ids=self.completion_ids, attention_mask=mask, position_ids=positions, past_key_values=cache
            ).logits  # (N - B', V)
        first_rows = torch.nonzero(self.completion_mask[:, 0], as_tuple=True)[0]  # (B',) rows with a completion
        rest_rows, rest_cols = torch.nonzero(scored, as_tuple=True)  # (N - B',)
        first_targets = self.completion_ids[first_rows, 0]
        rest_targets = self.completion_ids[rest_rows, rest_cols + 1]
        order = torch.argsort(torch.cat([first_rows * width, rest_rows * width + rest_cols + 1]))
        parts = [(first_logits[of_row[first_rows]], first_targets, first_rows), (rest_logits, rest_targets, rest_rows)]
        return parts, order


def partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (DeepSpeed marks each with ``ds_status``)."""
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_status")


@contextlib.contextmanager
def head_on_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """While inside, the model's output head maps only the hidden states at ``positions`` (B, L) to logits,
    so the forward returns logits (N, V) for the N selected positions instead of (B, L, V).

    The head is the largest single matrix of a small model (SmolLM2-135M: 49152 × 576, a fifth of its
    weights) and prompt and padding positions are about 40% of the demo's: their logits would be computed,
    back-propagated through and thrown away. A pre-hook on the head changes its input and nothing else, so
    the forward stays the model's own (DeepSpeed's engine, ZeRO-3's parameter hooks, a peft wrapper).
    """
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model  # DeepSpeed
    head = inner.get_output_embeddings()

    def select(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden, *rest = args  # (B, L, H)
        return (hidden[positions], *rest)  # (N, H)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
