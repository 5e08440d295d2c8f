"""Each reward on known texts, the length penalty, and errors that name the reward."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from actors.rewards import (
    CallableReward,
    HFReward,
    RewardError,
    VaderReward,
    checked_scores,
    make_reward,
    score_rollouts,
)
from actors.rollout import ROLLOUT_SCHEMA
from warp_rlhf.config import RewardConfig

TEXTS = ["What a wonderful, lovely and delightful film!", "A terrible, boring mess.", "The film opens at dawn."]


def chars(prompts, completions):  # a `module:function` reward for the tests
    return [float(len(c)) for c in completions]


def nan_reward(prompts, completions):
    return [math.nan] * len(completions)


def short_reward(prompts, completions):
    return [1.0]


def test_vader_scores_known_texts():
    scores = VaderReward().score([""] * 3, TEXTS)
    assert scores.dtype == np.float32
    assert scores[0] > 0.8 and scores[1] < -0.6 and scores[2] == 0.0


def test_callable_reward_by_module_path():
    reward = make_reward(RewardConfig(kind="callable", path="tests.actors.test_rewards:chars"))
    assert checked_scores(reward, ["p"] * 3, TEXTS).tolist() == [float(len(t)) for t in TEXTS]


@pytest.mark.parametrize(
    ("function", "message"), [("nan_reward", "returned nan"), ("short_reward", "returned 1 scores for 3")]
)
def test_bad_scores_name_the_reward(function, message):
    reward = CallableReward(f"tests.actors.test_rewards:{function}")
    with pytest.raises(RewardError, match=f"tests.actors.test_rewards:{function}.*{message}"):
        checked_scores(reward, ["p"] * 3, TEXTS)


def test_unimportable_callable_is_an_error():
    with pytest.raises(RewardError, match="no_such_module"):
        CallableReward("no_such_module:f")


def test_score_rollouts_applies_length_penalty():
    rows = {
        "prompt": ["p", "p"],
        "prompt_ids": [[1], [1]],
        "completion": ["abc", "a"],
        "completion_ids": [[5, 6, 7, 0], [5]],
        "logprobs": [[-1.0] * 4, [-1.0]],
        "finish_reason": ["stop", "length"],
        "reward": [None, None],
        "group_id": [0, 0],
        "run": [0, 0],
        "iteration": [1, 1],
        "step": [0, 0],
        "version": [0, 0],
        "engine": [0, 0],
    }
    table = pa.Table.from_pydict(rows, schema=ROLLOUT_SCHEMA)
    scored = score_rollouts(table, CallableReward("tests.actors.test_rewards:chars"), length_penalty=0.5)
    assert scored.schema.equals(ROLLOUT_SCHEMA)
    assert scored.column("reward").to_pylist() == [3.0 - 0.5 * 4, 1.0 - 0.5 * 1]


def _direct_scores(path, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_hf_reward_batches_match_one_by_one(classifier_dir):
    prompts = ["Review: "] * 3
    reward = HFReward(str(classifier_dir), batch_size=2)
    scores = checked_scores(reward, prompts, TEXTS)
    expected = _direct_scores(classifier_dir, [p + t for p, t in zip(prompts, TEXTS, strict=True)])
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert len(set(scores.tolist())) == 3


@pytest.mark.ray
def test_hf_reward_in_its_own_ray_actor(classifier_dir, ray_cluster):
    cfg = RewardConfig(kind="hf", path=str(classifier_dir), batch_size=2, remote=True, num_cpus=0.5)
    remote = make_reward(cfg)
    try:
        local = HFReward(str(classifier_dir), batch_size=3)
        np.testing.assert_allclose(remote.score(["x"] * 3, TEXTS), local.score(["x"] * 3, TEXTS), rtol=1e-5)
        assert remote.name == f"hf:{classifier_dir}"
    finally:
        remote.shutdown()
