"""GenerationEngine with LoRA slots (real vLLM, tiny model): each run's prompts are sampled with that run's
adapter and no other, rows carry the adapter's version, a base load drops every adapter, a foreign adapter is
refused, and the engine's samples and log-probs are those of the merged model W + s·B·A in transformers."""

from __future__ import annotations

import pytest
import torch

from actors.adapter import AdapterWeights
from actors.engine import GenerationEngine, WeightMismatchError

from .conftest import PROMPTS, hf_greedy, random_weights

pytestmark = pytest.mark.vllm

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, actors_cfg):
    engine = GenerationEngine(tiny_model_dir, actors_cfg, dtype="float32", seed=0, max_loras=2, max_lora_rank=RANK)
    yield engine
    engine.shutdown()


def make_adapter(model, seed: int, version: int, targets=TARGETS) -> tuple[AdapterWeights, object]:
    """Random factors for ``model``'s layers, and a copy of ``model`` with them merged in (the reference)."""
    import copy

    from merger.flat import flatten

    generator = torch.Generator().manual_seed(seed)
    merged, factors = copy.deepcopy(model), []
    for layer_index, layer in enumerate(merged.model.layers):
        for target in targets:
            linear = getattr(layer.self_attn, target)
            a = torch.randn(RANK, linear.in_features, generator=generator) * 0.3
            b = torch.randn(linear.out_features, RANK, generator=generator) * 0.3
            with torch.no_grad():
                linear.weight.add_(ALPHA / RANK * b @ a)
            prefix = f"base_model.model.model.layers.{layer_index}.self_attn.{target}"
            factors += [(f"{prefix}.lora_A.weight", a), (f"{prefix}.lora_B.weight", b)]
    return AdapterWeights(flatten(factors, version), RANK, ALPHA, targets), merged.eval()


def greedy(engine, run: int):
    return engine.generate(PROMPTS, n=1, temperature=0.0, run=run).to_pylist()


def assert_sampled_by(rows, model) -> None:
    """Greedy tokens and their log-probs are ``model``'s (transformers, teacher-forced)."""
    for row in rows:
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"]), row["prompt"]
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(row["prompt_ids"])
        expected = [logp[start - 1 + i, t].item() for i, t in enumerate(row["completion_ids"])]
        assert row["logprobs"] == pytest.approx(expected, abs=1e-3)


def test_each_run_samples_with_its_own_adapter_and_never_another(engine):
    base, flat = random_weights(engine.model_dir, seed=3, version=10)
    engine.load_weights(flat, version=10)
    first, first_model = make_adapter(base, seed=1, version=11)
    second, second_model = make_adapter(base, seed=2, version=12)
    assert engine.load_adapter(first, run=1) == first.nbytes < flat.nbytes / 5
    engine.load_adapter(second, run=2)
    # Interleaved, as two runs' steps arrive: each run's rows come from its own adapter only.
    for run, model, version in ((1, first_model, 11), (2, second_model, 12), (1, first_model, 11)):
        rows = greedy(engine, run)
        assert {r["version"] for r in rows} == {version} and {r["run"] for r in rows} == {run}
        assert_sampled_by(rows, model)
    assert [r["completion_ids"] for r in greedy(engine, 1)] != [r["completion_ids"] for r in greedy(engine, 2)]
    assert_sampled_by(greedy(engine, 3), base)  # a run with no adapter yet: the base itself

    # Run 1's next step replaces its adapter in place; run 2 is untouched.
    newer, newer_model = make_adapter(base, seed=4, version=13)
    engine.load_adapter(newer, run=1)
    assert_sampled_by(greedy(engine, 1), newer_model)
    assert_sampled_by(greedy(engine, 2), second_model)


def test_a_new_base_drops_every_adapter(engine):
    base, flat = random_weights(engine.model_dir, seed=5, version=20)
    adapter, _ = make_adapter(base, seed=6, version=21)
    engine.load_adapter(adapter, run=1)
    engine.load_weights(flat, version=20)  # the next iteration's θ_init
    rows = greedy(engine, 1)
    assert {r["version"] for r in rows} == {20}
    assert_sampled_by(rows, base)
    adapter, merged = make_adapter(base, seed=7, version=22)
    engine.load_adapter(adapter, run=1)
    assert_sampled_by(greedy(engine, 1), merged)


def test_an_adapter_for_other_layers_is_refused_and_the_previous_one_kept(engine):
    base, flat = random_weights(engine.model_dir, seed=8, version=30)
    engine.load_weights(flat, version=30)
    adapter, merged = make_adapter(base, seed=9, version=31)
    engine.load_adapter(adapter, run=2)
    foreign = AdapterWeights(
        adapter.weights.__class__(adapter.weights.buffer, tuple(
            s.__class__(s.name.replace("self_attn", "cross_attn"), s.dtype, s.shape, s.offset, s.nbytes)
            for s in adapter.weights.specs), 32),
        RANK, ALPHA, TARGETS,
    )  # fmt: skip
    with pytest.raises(WeightMismatchError, match="cross_attn"):
        engine.load_adapter(foreign, run=2)
    assert {r["version"] for r in greedy(engine, 2)} == {31}
    assert_sampled_by(greedy(engine, 2), merged)


def test_the_adapter_directory_is_held_while_the_engine_lives(engine):
    """Tests run side by side: the lifecycle test counts /dev/shm entries no process holds as leaked, and a live
    LoRA engine's adapter directory (written once, then only read by vLLM on a load) must not count."""
    from pathlib import Path

    from tests.processes import unheld_shm

    root = Path(engine.adapter_root)
    assert root.is_dir()
    assert root.name not in unheld_shm(since=root.stat().st_ctime - 1, root=root.parent)
