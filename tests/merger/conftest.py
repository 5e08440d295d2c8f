"""Fixtures of the merger tests: the tiny model's weights and policies made from it by adding noise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from merger.checkpoint import Checkpoint, save_hf


def perturbed(weights: dict[str, torch.Tensor], seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    """θ + N(0, scale²) per element, in θ's dtype: a stand-in for an RL run's final policy."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (t.float() + scale * torch.randn(t.shape, generator=generator)).to(t.dtype) for name, t in weights.items()
    }


@pytest.fixture(scope="session")
def tiny_weights(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(tiny_model_dir) as checkpoint:
        return {name: checkpoint.tensor(name) for name in checkpoint.entries}


@pytest.fixture(scope="session")
def make_policies(
    tiny_model_dir: Path, tiny_weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., list[Path]]:
    """make_policies(m, dtype=float32) → m policy directories (cached per (m, dtype) for the session)."""
    made: dict[tuple[int, torch.dtype], list[Path]] = {}

    def make(m: int, dtype: torch.dtype = torch.float32) -> list[Path]:
        if (m, dtype) not in made:
            root = tmp_path_factory.mktemp(f"policies-{m}-{str(dtype).removeprefix('torch.')}")
            base = {name: t.to(dtype) for name, t in tiny_weights.items()}
            made[m, dtype] = [save_hf(perturbed(base, seed), root / f"run-{seed}", tiny_model_dir) for seed in range(m)]
        return made[m, dtype]

    return make


@pytest.fixture(scope="session")
def bf16_init_dir(tiny_model_dir: Path, tiny_weights: dict[str, torch.Tensor], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16") / "init"
    return save_hf({n: t.to(torch.bfloat16) for n, t in tiny_weights.items()}, out, tiny_model_dir)
