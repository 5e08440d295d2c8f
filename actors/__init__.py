"""Experience: vLLM engines as Ray actors, pools of them, reward scoring, the rollout schema, weight receipt.

Importing this package imports none of vllm, ray, torch or deepspeed: the public names below are
resolved on first use (PEP 562), so the CLI and config validation stay fast. Nothing here ever
imports deepspeed; learners import only the wire contracts :mod:`actors.rollout` and
:mod:`actors.broadcast` (the collective weight broadcast their rank 0 sends).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ROLLOUT_SCHEMA": "actors.rollout",
    "RolloutError": "actors.rollout",
    "check_rollouts": "actors.rollout",
    "to_tensors": "actors.rollout",
    "GenerationEngine": "actors.engine",
    "GenerationError": "actors.engine",
    "STALE": "actors.engine",
    "WeightMismatchError": "actors.engine",
    "PartialLoadError": "actors.engine",
    "ActorPool": "actors.pool",
    "PoolError": "actors.pool",
    "Reward": "actors.rewards",
    "RewardError": "actors.rewards",
    "VaderReward": "actors.rewards",
    "HFReward": "actors.rewards",
    "CallableReward": "actors.rewards",
    "RemoteReward": "actors.rewards",
    "make_reward": "actors.rewards",
    "score_rollouts": "actors.rewards",
    "BroadcastSender": "actors.broadcast",
    "WeightPublisher": "actors.transport",
    "ObjectStoreTransport": "actors.transport",
    "CollectiveTransport": "actors.transport",
    "make_transport": "actors.transport",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
