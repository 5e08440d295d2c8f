"""GenerationEngine with real vLLM on the tiny model: rollout rows, in-place weight loads, bad input."""

from __future__ import annotations

import pyarrow as pa
import pytest

from actors.engine import GenerationEngine, GenerationError
from actors.rollout import ROLLOUT_SCHEMA

from .conftest import NEW_TOKENS, PROMPTS, hf_greedy, random_weights

pytestmark = pytest.mark.vllm

# Longer than a KV block, so a stale prefix-cache hit after a weight load would change the output.
LONG_PROMPT = " ".join(["the music was lovely and the story was a delight"] * 8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, actors_cfg):
    engine = GenerationEngine(tiny_model_dir, actors_cfg, dtype="float32", seed=0)
    yield engine
    engine.shutdown()


def _greedy(engine, prompts):
    return engine.generate(prompts, n=1, temperature=0.0)


def test_rows_follow_the_schema(engine, actors_cfg):
    table = engine.generate(PROMPTS, run=1, iteration=2, step=3)
    n = actors_cfg.samples_per_prompt
    assert table.schema.equals(ROLLOUT_SCHEMA)
    assert table.num_rows == len(PROMPTS) * n
    assert table.column("group_id").to_pylist() == [g for g in range(len(PROMPTS)) for _ in range(n)]
    assert table.column("prompt").to_pylist() == [p for p in PROMPTS for _ in range(n)]
    assert set(table.column("run").to_pylist()) == {1} and set(table.column("step").to_pylist()) == {3}
    eos = engine.tokenizer.eos_token_id
    for row in table.to_pylist():
        assert row["reward"] is None and row["version"] == engine.version
        assert len(row["logprobs"]) == len(row["completion_ids"]) <= NEW_TOKENS
        assert all(lp <= 0 for lp in row["logprobs"])
        if row["finish_reason"] == "stop":
            assert row["completion_ids"][-1] == eos
        else:
            assert len(row["completion_ids"]) == NEW_TOKENS


def test_prompt_table_input(engine):
    table = engine.generate(pa.table({"text": PROMPTS[:2]}), n=3, prompt_column="text", group_offset=10)
    assert table.column("group_id").to_pylist() == [10, 10, 10, 11, 11, 11]


def test_load_weights_matches_transformers_greedy(engine):
    prompts = [*PROMPTS, LONG_PROMPT]
    before = _greedy(engine, prompts)
    model, flat = random_weights(engine.model_dir, seed=1)
    assert engine.load_weights(flat, version=5) == 5
    after = _greedy(engine, prompts)
    assert set(after.column("version").to_pylist()) == {5}
    changed = 0
    for row_before, row in zip(before.to_pylist(), after.to_pylist(), strict=True):
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"]), row["prompt"]
        changed += row["completion_ids"] != row_before["completion_ids"]
    assert changed >= len(prompts) - 1


def test_logprobs_are_the_models(engine):
    import torch

    model, flat = random_weights(engine.model_dir, seed=2)
    engine.load_weights(flat, version=6)
    row = _greedy(engine, PROMPTS[:1]).to_pylist()[0]
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # (L, V)
    start = len(row["prompt_ids"])
    expected = [logp[start - 1 + i, t].item() for i, t in enumerate(row["completion_ids"])]
    assert row["logprobs"] == pytest.approx(expected, abs=1e-4)


def test_score_is_teacher_forced_sequence_logprob(engine):
    import torch

    model, flat = random_weights(engine.model_dir, seed=3)
    engine.load_weights(flat, version=7)
    table = engine.generate(PROMPTS, n=2, temperature=1.0, top_k=-1)
    scores = engine.score(table)
    assert scores.shape == (table.num_rows,)
    # The sampler's own (raw) logprobs of the same tokens, summed, agree with the prefill scores.
    sampled = [sum(row["logprobs"]) for row in table.to_pylist()]
    assert scores == pytest.approx(sampled, abs=1e-3)
    row = table.to_pylist()[0]
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # (L, V)
    start = len(row["prompt_ids"])
    expected = sum(logp[start - 1 + i, t].item() for i, t in enumerate(row["completion_ids"]))
    assert scores[0] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "no prompts"),
        (pa.table({"prompt": pa.array([], pa.string())}), {}, "no prompts"),
        (pa.table({"text": ["hi"]}), {}, "no column 'prompt'"),
        (["word " * 200], {}, "longer than actors.max_model_len"),
        (["hi"], {"n": 0}, "n = 0"),
        ([""], {}, "non-empty strings"),
    ],
)
def test_bad_input_is_a_clear_error(engine, prompts, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        engine.generate(prompts, **kwargs)
    assert issubclass(GenerationError, ValueError)
