"""The merger: weight-space maths of WARP, HF-format safetensors checkpoints, and the merger service.

Importing this package imports nothing heavy (no torch, ray, vllm or deepspeed): names are resolved
on first use by the module-level ``__getattr__`` below, so ``from merger import slerp`` works and the
CLI starts fast. Modules: ``weights`` (pure maths), ``checkpoint`` (read/write HF directories),
``streaming`` (tensor-by-tensor merges), ``service`` (Merger and its Ray-actor form), ``flat``
(FlatWeights), ``errors``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "slerp": "merger.weights",
    "lerp": "merger.weights",
    "liti": "merger.weights",
    "merge_checkpoints": "merger.streaming",
    "merge_stream": "merger.streaming",
    "Checkpoint": "merger.checkpoint",
    "CheckpointWriter": "merger.checkpoint",
    "save_hf": "merger.checkpoint",
    "load_flat": "merger.checkpoint",
    "Merger": "merger.service",
    "MergerService": "merger.service",
    "FlatWeights": "merger.flat",
    "flatten": "merger.flat",
    "CheckpointError": "merger.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'merger' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
