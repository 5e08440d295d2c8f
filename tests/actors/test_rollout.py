"""The rollout schema's contract: Parquet round-trip unchanged, padded tensors for learners."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from actors.rollout import ROLLOUT_SCHEMA, to_tensors


def _table() -> pa.Table:
    rows = {
        "prompt": ["a", "a", "bc"],
        "prompt_ids": [[1], [1], [2, 3]],
        "completion": ["x", "yz", ""],
        "completion_ids": [[4, 0], [5, 6, 0], [0]],
        "logprobs": [[-0.5, -1.0], [-0.1, -0.2, -0.3], [-2.0]],
        "finish_reason": ["stop", "stop", "length"],
        "reward": [0.25, None, -1.0],
        "group_id": [0, 0, 1],
        "run": [0, 0, 0],
        "iteration": [1, 1, 1],
        "step": [3, 3, 3],
        "version": [7, 7, 7],
        "engine": [0, 1, 1],
    }
    return pa.Table.from_pydict(rows, schema=ROLLOUT_SCHEMA)


def test_parquet_round_trip_is_unchanged(tmp_path):
    table = _table()
    pq.write_table(table, tmp_path / "rollouts.parquet")
    back = pq.read_table(tmp_path / "rollouts.parquet")
    assert back.schema.equals(ROLLOUT_SCHEMA)
    assert back.equals(table)


def test_to_tensors_masks_completions():
    batch = to_tensors(_table(), pad_id=9)
    assert batch["input_ids"].tolist()[2] == [2, 3, 0, 9]
    assert batch["completion_mask"].sum().item() == 6
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0]
    # The sampler's log-prob of each completion token sits at that token's position (0 elsewhere).
    import torch

    torch.testing.assert_close(batch["sampler_logprobs"][1], torch.tensor([0.0, -0.1, -0.2, -0.3]))
    scored = batch["sampler_logprobs"][batch["completion_mask"]]
    torch.testing.assert_close(scored, torch.tensor([-0.5, -1.0, -0.1, -0.2, -0.3, -2.0]))


def test_to_tensors_refuses_an_empty_prompt():
    import pytest

    from actors.rollout import RolloutError

    table = _table()
    prompt_ids = table.column("prompt_ids").to_pylist()
    prompt_ids[2] = []
    table = table.set_column(1, "prompt_ids", pa.array(prompt_ids, type=ROLLOUT_SCHEMA.field("prompt_ids").type))
    with pytest.raises(RolloutError, match="row 2 has empty prompt_ids"):
        to_tensors(table, pad_id=9)
