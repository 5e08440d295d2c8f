"""The rollout schema: one Arrow table per batch of samples, from engines to learners and Parquet logs.

Imports pyarrow only; torch is imported inside :func:`to_tensors`. Learners may import this module
(and only this one) from ``actors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import torch

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),  # prompt text as given
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # prompt tokens fed to the engine
        pa.field("completion", pa.string(), nullable=False),  # decoded completion text
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),  # sampled tokens, EOS included
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),  # sampler log p of each sampled token
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS/stop string) or "length"
        pa.field("reward", pa.float32()),  # r(x, y) incl. length penalty; null until scored
        pa.field("group_id", pa.int64(), nullable=False),  # which prompt: samples of one prompt share it
        pa.field("run", pa.int32(), nullable=False),  # m, 0-based run index within the iteration
        pa.field("iteration", pa.int32(), nullable=False),  # i, 1-based WARP iteration
        pa.field("step", pa.int32(), nullable=False),  # t, 0-based learner step that consumes it
        pa.field("version", pa.int64(), nullable=False),  # weights version that generated it
        pa.field("engine", pa.int32(), nullable=False),  # which engine of the run's pool sampled it
    ]
)


class RolloutError(ValueError):
    """A table does not follow ROLLOUT_SCHEMA."""


def check_rollouts(table: pa.Table) -> None:
    """Raise RolloutError naming the first missing or mistyped column."""
    for field in ROLLOUT_SCHEMA:
        if field.name not in table.column_names:
            raise RolloutError(f"rollout table has no column {field.name!r}")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise RolloutError(f"rollout column {field.name!r} is {actual}, expected {field.type}")


def to_tensors(table: pa.Table, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion tensors for teacher forcing.

    Returns input_ids (B, L) int64, attention_mask (B, L) int64, completion_mask (B, L) bool, true
    where input_ids holds a completion token (the positions whose log-probabilities are summed), and
    sampler_logprobs (B, L) float32: the sampler's log-prob of each completion token, 0 elsewhere.
    """
    import numpy as np
    import torch

    check_rollouts(table)
    prompts = table.column("prompt_ids").to_pylist()
    completions = table.column("completion_ids").to_pylist()
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    batch, width = len(lengths), max(lengths, default=0)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)  # (B, L)
    attention = np.zeros((batch, width), dtype=np.int64)  # (B, L)
    completion = np.zeros((batch, width), dtype=bool)  # (B, L)
    sampler = np.zeros((batch, width), dtype=np.float32)  # (B, L)
    logprobs = table.column("logprobs").to_pylist()
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if not p:  # teacher forcing scores a token from the position before it
            raise RolloutError(f"rollout row {row} has empty prompt_ids: its first completion token cannot be scored")
        input_ids[row, : len(p)] = p
        input_ids[row, len(p) : len(p) + len(c)] = c
        attention[row, : len(p) + len(c)] = 1
        completion[row, len(p) : len(p) + len(c)] = True
        sampler[row, len(p) : len(p) + len(c)] = logprobs[row]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "completion_mask": torch.from_numpy(completion),
        "sampler_logprobs": torch.from_numpy(sampler),
    }
