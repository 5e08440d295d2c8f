"""A merged checkpoint loads in vLLM as-is and generates."""

from __future__ import annotations

import pytest

from warp_rlhf.cli import main


@pytest.mark.vllm
def test_vllm_loads_a_merged_tiny_model_and_generates(tiny_model_dir, make_policies, tmp_path) -> None:
    p1, p2 = make_policies(2)
    out = tmp_path / "merged"
    assert (
        main(["merge", "--init", str(tiny_model_dir), "--policy", str(p1), "--policy", str(p2), "--out", str(out)]) == 0
    )

    import vllm  # VLLM_ENABLE_V1_MULTIPROCESSING=0 (tests/conftest.py): engine and worker in this process

    llm = vllm.LLM(
        model=str(out),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=256,
        seed=0,
    )
    try:
        params = vllm.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        (result,) = llm.generate([PROMPT], params)
        tokens = list(result.outputs[0].token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert tokens == _transformers_greedy(out, 8)  # vLLM ran the merged weights, not something else


PROMPT = "The film opens on a quiet street"


def _transformers_greedy(model_dir, new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    for _ in range(new_tokens):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -new_tokens:].tolist()
