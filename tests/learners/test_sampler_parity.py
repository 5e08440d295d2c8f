"""The learner scores the sampler's distribution: its per-token log-probs of vLLM's samples equal vLLM's own.

vLLM samples at temperature 0.9 (top-k off, so the sampling distribution is softmax(logits / 0.9) over
the whole vocabulary) and reports each sampled token's log-prob in ``processed`` mode (after the
temperature); the learner's objective function scores the same tokens by teacher forcing with the
same temperature. Tolerance, fp32: 2e-4 nats per token (vLLM's CPU kernels and transformers' differ in
summation order; measured ~1e-5). At temperature 1, the scores would differ by far more (checked too).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.rollout import to_tensors
from learners.objective import sequence_logprobs_and_entropy
from tests.actors.conftest import PROMPTS

pytestmark = pytest.mark.vllm
TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def sampled(tiny_model_dir):
    from actors.engine import GenerationEngine
    from warp_rlhf.config import ActorsConfig

    cfg = ActorsConfig(kv_cache_gib=0.125, max_model_len=128, max_new_tokens=16, samples_per_prompt=4)
    cfg = dataclasses.replace(cfg, temperature=TEMPERATURE, top_k=-1, logprobs="processed")
    engine = GenerationEngine(tiny_model_dir, cfg, dtype="float32", seed=0)
    try:
        return engine.generate(PROMPTS)
    finally:
        engine.shutdown()


def _learner_token_logprobs(model_dir, table, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = to_tensors(table, pad_id=0)
    with torch.no_grad():
        _, _, tokens = sequence_logprobs_and_entropy(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], temperature, temperature
        )
    sampler = batch["sampler_logprobs"][:, 1:][batch["completion_mask"][:, 1:]]
    return tokens, sampler


def test_learner_log_probs_match_the_sampler_at_its_temperature(tiny_model_dir, sampled):
    learner, sampler = _learner_token_logprobs(tiny_model_dir, sampled, TEMPERATURE)
    assert learner.numel() == sum(len(c) for c in sampled.column("completion_ids").to_pylist()) > 50
    assert float((learner - sampler).abs().max()) < 2e-4
    at_t1, _ = _learner_token_logprobs(tiny_model_dir, sampled, 1.0)
    assert float((at_t1 - sampler).abs().mean()) > 1e-2  # scoring at T = 1 (the old behaviour) is visibly off
