"""Rewards: one small protocol, three implementations, and scoring of rollout tables.

A reward is anything with a ``name`` and ``score(prompts, completions) -> np.ndarray`` (float32, one
score per completion). Implementations:

- :class:`VaderReward`: VADER's compound sentiment of the completion, in [-1, 1] (the demo's reward).
  Only the completion is scored: the prompt is not the policy's doing.
- :class:`HFReward`: any local ``AutoModelForSequenceClassification`` directory, batched, scoring
  prompt + completion; :class:`RemoteReward` runs one in its own Ray actor (``reward.remote``).
- :class:`CallableReward`: a Python function given as ``module:function``.

:func:`score_rollouts` fills a rollout table's ``reward`` column, applying the paper's optional
length penalty −c·len(y) (len in completion tokens). A reward returning NaN/inf or the wrong number
of scores raises :class:`RewardError` naming it. torch, transformers and ray are imported lazily;
never vllm or deepspeed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from warp_rlhf.config import RewardConfig


class RewardError(ValueError):
    """A reward could not be built or returned unusable scores; the message names the reward."""


class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray: ...


def checked_scores(reward: Reward, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """``reward.score`` as float32, refusing a wrong count, NaN or infinity with the reward's name."""
    if len(prompts) != len(completions):
        raise RewardError(f"{len(prompts)} prompts for {len(completions)} completions")
    scores = np.asarray(reward.score(prompts, completions), dtype=np.float32).reshape(-1)
    if scores.shape[0] != len(completions):
        raise RewardError(f"reward {reward.name!r} returned {scores.shape[0]} scores for {len(completions)} texts")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise RewardError(
            f"reward {reward.name!r} returned {scores[bad[0]]} for completion {bad[0]} "
            f"({completions[bad[0]][:80]!r}); {bad.size} non-finite scores in all"
        )
    return scores


def score_rollouts(table: pa.Table, reward: Reward, length_penalty: float = 0.0) -> pa.Table:
    """The rollout table with ``reward`` = r(x, y) − length_penalty · len(completion_ids)."""
    prompts = table.column("prompt").to_pylist()
    completions = table.column("completion").to_pylist()
    scores = checked_scores(reward, prompts, completions)
    if length_penalty:
        lengths = pc.list_value_length(table.column("completion_ids")).to_numpy(zero_copy_only=False)
        scores = scores - np.float32(length_penalty) * lengths.astype(np.float32)
    index = table.schema.get_field_index("reward")
    return table.set_column(index, table.schema.field("reward"), pa.array(scores, type=pa.float32()))


class VaderReward:
    """VADER compound sentiment of each completion, in [-1, 1]."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(c)["compound"] for c in completions], dtype=np.float32)


class HFReward:
    """A local sequence-classification model scoring prompt + completion, ``batch_size`` texts at a time.

    One label: its logit. Several: the logit of the last label (the positive class of binary
    sentiment classifiers) minus the first, a margin that does not depend on the other labels' scale.
    """

    def __init__(self, path: str, batch_size: int = 32, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.batch_size = f"hf:{path}", batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.pad_token_id is None:  # decoder-only classifiers find the last token by padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        import torch

        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits.float()  # (B, labels)
            out.append(logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0])  # (B,)
        return torch.cat(out).cpu().numpy().astype(np.float32)


class RemoteReward:
    """A reward built inside its own Ray actor (e.g. a reward model on its own CPU or GPU)."""

    def __init__(
        self,
        name: str,
        cls: type,
        *args: Any,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        placement_group: Any = None,
        **kwargs: Any,
    ):
        import ray

        self.name = name
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, 0)
        self._actor = ray.remote(cls).options(**options).remote(*args, **kwargs)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        import ray

        return ray.get(self._actor.score.remote(list(prompts), list(completions)))

    def shutdown(self) -> None:
        import ray

        ray.kill(self._actor)


class CallableReward:
    """``module:function`` where ``function(prompts, completions)`` returns one float per completion."""

    def __init__(self, spec: str) -> None:
        module_name, _, attr = spec.partition(":")
        self.name = spec
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RewardError(f"reward {spec!r}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
        if not callable(function):
            raise RewardError(f"reward {spec!r} is not callable")
        self._function: Callable[[Sequence[str], Sequence[str]], Any] = function

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.asarray(self._function(list(prompts), list(completions)), dtype=np.float32)


def make_reward(cfg: RewardConfig, placement_group: Any = None) -> Reward:
    """The reward a config names; ``reward.remote`` puts an HF reward model in its own actor, in ``placement_group``."""
    if cfg.kind == "vader":
        return VaderReward()
    if cfg.kind == "callable":
        return CallableReward(cfg.path)
    if cfg.remote:
        resources = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "placement_group": placement_group}
        return RemoteReward(f"hf:{cfg.path}", HFReward, cfg.path, cfg.batch_size, **resources)
    return HFReward(cfg.path, cfg.batch_size)
