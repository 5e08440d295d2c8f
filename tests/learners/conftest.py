"""Fixtures for learner tests: hand-built rollout tables (ROLLOUT_SCHEMA) and a learners config."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.rollout import ROLLOUT_SCHEMA


def make_rollouts(
    groups: int = 4,
    samples: int = 4,
    vocab: int = 512,
    prompt_len: tuple[int, int] = (3, 7),
    completion_len: tuple[int, int] = (2, 9),
    seed: int = 0,
    rewards: np.ndarray | None = None,
) -> pa.Table:
    """A scored rollout batch of random tokens: ``groups`` prompts × ``samples`` completions each."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        prompt = rng.integers(1, vocab, rng.integers(*prompt_len)).astype(np.int32).tolist()
        for _ in range(samples):
            completion = rng.integers(1, vocab, rng.integers(*completion_len)).astype(np.int32).tolist()
            rows.append((g, prompt, completion))
    n = len(rows)
    reward = rng.normal(size=n).astype(np.float32) if rewards is None else np.asarray(rewards, np.float32)
    columns = {
        "prompt": [f"prompt {g}" for g, _, _ in rows],
        "prompt_ids": [p for _, p, _ in rows],
        "completion": ["" for _ in rows],
        "completion_ids": [c for _, _, c in rows],
        "logprobs": [[-1.0] * len(c) for _, _, c in rows],
        "finish_reason": ["length"] * n,
        "reward": reward,
        "group_id": [100 + g for g, _, _ in rows],
        "run": [0] * n,
        "iteration": [1] * n,
        "step": [0] * n,
        "version": [0] * n,
        "engine": [0] * n,
    }
    return pa.table(columns, schema=ROLLOUT_SCHEMA)


@pytest.fixture(scope="session")
def rollouts() -> pa.Table:
    return make_rollouts()
