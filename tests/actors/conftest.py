"""Shared pieces of the actors tests: a small engine config, random new weights, transformers' greedy reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from warp_rlhf.config import ActorsConfig

PROMPTS = ["The film opens on a quiet street", "I expected a dull sequel, but", "The acting was", "A great cast"]
NEW_TOKENS = 12


@pytest.fixture(scope="session")
def actors_cfg() -> ActorsConfig:
    return ActorsConfig(
        kv_cache_gib=0.125, max_model_len=128, max_new_tokens=NEW_TOKENS, samples_per_prompt=2, num_cpus=1.0
    )


def random_weights(model_dir: Path, seed: int, version: int = 0):
    """A transformers model with freshly perturbed weights and its FlatWeights (tied lm_head left out)."""
    import torch
    from transformers import AutoModelForCausalLM

    from merger.flat import flatten

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    tied = model.config.tie_word_embeddings
    flat = flatten(((n, t) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")), version)
    return model, flat


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int = NEW_TOKENS) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, attention_mask=None
        )
    return out[0, len(prompt_ids) :].tolist()
