"""Learners: REINFORCE on the KL-shaped reward with each run's own EMA anchor, on DeepSpeed ranks.

Importing this package imports nothing heavy (no torch, deepspeed, ray or vllm): the public names
are loaded on first use. ``learners`` never imports vllm, and from ``actors`` only ``actors.rollout``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from learners.anchor import EmaAnchor
    from learners.group import LearnerGroup
    from learners.learner import LearnerRank

_EXPORTS = {"LearnerRank": "learners.learner", "LearnerGroup": "learners.group", "EmaAnchor": "learners.anchor"}
__all__ = ["EmaAnchor", "LearnerGroup", "LearnerRank"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'learners' has no attribute {name!r}")
