"""Verified weight loads: a load that is not the model's whole parameter set never takes a version.

Real vLLM on the tiny model, in-process and as a 1-engine pool: refused before writing (renamed,
missing, misshaped tensors; also over a collective broadcast, which is drained), and failed part-way
(a corrupt buffer, a parameter the loader never wrote), after which the engine refuses to serve until
a complete load.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from actors.engine import STALE, GenerationEngine, PartialLoadError, WeightMismatchError
from actors.worker_extension import weight_mismatch
from merger.flat import FlatWeights, TensorSpec

from .conftest import PROMPTS, hf_greedy, random_weights

RENAMED = ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.post_attn_norm.weight")


def _renamed(flat: FlatWeights, old: str, new: str) -> FlatWeights:
    specs = tuple(dataclasses.replace(s, name=new) if s.name == old else s for s in flat.specs)
    return FlatWeights(flat.buffer, specs, flat.version)


def _without(flat: FlatWeights, name: str) -> FlatWeights:
    return FlatWeights(flat.buffer, tuple(s for s in flat.specs if s.name != name), flat.version)


def _greedy_matches(engine, model) -> bool:  # noqa: ANN001
    table = engine.generate(PROMPTS, n=1, temperature=0.0)
    return all(row["completion_ids"] == hf_greedy(model, row["prompt_ids"]) for row in table.to_pylist())


def _one_row():  # noqa: ANN202 - a one-row rollout table to score
    import pyarrow as pa

    from actors.rollout import ROLLOUT_SCHEMA

    row = {f.name: None for f in ROLLOUT_SCHEMA}
    row.update(prompt="x", prompt_ids=[1, 2], completion="y", completion_ids=[3], logprobs=[-1.0], finish_reason="stop",
               group_id=0, run=0, iteration=1, step=0, version=0, engine=0)  # fmt: skip
    return pa.Table.from_pylist([row], schema=ROLLOUT_SCHEMA)


def test_weight_mismatch_names_every_kind_of_difference():
    expected = {"a": (2,), "b": (3,), "c": (4,)}
    spec = lambda name, shape: TensorSpec(name, "float32", shape, 0, 4)  # noqa: E731
    assert weight_mismatch(expected, [spec("a", (2,)), spec("b", (3,)), spec("c", (4,))], tied=False) is None
    assert weight_mismatch(expected, [spec("a", (2,)), spec("b", (3,)), spec("c", (4,)), spec("lm_head.weight", (1,))],
                           tied=True) is None  # fmt: skip
    assert weight_mismatch(expected | {"lm_head.weight": (1,)}, [spec("a", (2,)), spec("b", (3,)), spec("c", (4,))],
                           tied=True) is None  # a checkpoint that stores its tied head  # fmt: skip
    untied = weight_mismatch(expected | {"lm_head.weight": (1,)}, [spec("a", (2,)), spec("b", (3,)), spec("c", (4,))],
                             tied=False)  # fmt: skip
    assert untied == "3 tensors for the model's 4; missing (1): lm_head.weight"
    problem = weight_mismatch(expected, [spec("a", (2,)), spec("a", (2,)), spec("c", (2, 2)), spec("x", (1,))], False)
    assert problem.startswith("4 tensors for the model's 3")
    assert "missing (1): b" in problem and "unexpected (1): x" in problem and "repeated (1): a" in problem
    assert "misshaped (1): c (2, 2) (expected (4,))" in problem
    many = weight_mismatch({f"t{i}": (1,) for i in range(12)}, [], tied=False, limit=3)
    assert "missing (12): t0, t1, t10 and 9 more" in many


@pytest.fixture(scope="module")
def engine(tiny_model_dir, actors_cfg):
    engine = GenerationEngine(tiny_model_dir, actors_cfg, dtype="float32", seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def version5(engine):
    """The engine serving version 5, and the transformers model holding the same weights."""
    model, flat = random_weights(engine.model_dir, seed=41)
    assert engine.load_weights(flat, version=5) == 5
    return model, flat


@pytest.mark.vllm
def test_renamed_tensor_is_refused_and_the_previous_version_keeps_serving(engine, version5):
    model, _ = version5
    _, new = random_weights(engine.model_dir, seed=42)
    with pytest.raises(WeightMismatchError) as refused:
        engine.load_weights(_renamed(new, *RENAMED), version=6)
    message = str(refused.value)
    assert f"missing (1): {RENAMED[0]}" in message and f"unexpected (1): {RENAMED[1]}" in message
    assert "version 6 refused, nothing written (engine keeps serving version 5)" in message
    assert engine.weights_version() == 5
    assert _greedy_matches(engine, model)  # not one tensor of version 6 went in
    assert set(engine.generate(PROMPTS[:1], n=2).column("version").to_pylist()) == {5}


@pytest.mark.vllm
@pytest.mark.parametrize("change", ["missing", "misshaped"])
def test_missing_or_misshaped_tensor_is_refused(engine, version5, change):
    model, _ = version5
    _, new = random_weights(engine.model_dir, seed=43)
    name = "model.norm.weight"
    if change == "missing":
        bad, expect = _without(new, name), f"missing (1): {name}"
    else:
        specs = tuple(dataclasses.replace(s, shape=(2, 64)) if s.name == name else s for s in new.specs)
        bad, expect = FlatWeights(new.buffer, specs), f"misshaped (1): {name} (2, 64) (expected (128,))"
    with pytest.raises(WeightMismatchError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        engine.load_weights(bad, version=6)
    assert engine.weights_version() == 5 and _greedy_matches(engine, model)


@pytest.mark.vllm
def test_load_failing_part_way_makes_the_engine_stale_until_a_complete_load(engine, version5):
    _, new = random_weights(engine.model_dir, seed=44)
    middle = new.specs[len(new.specs) // 2]
    corrupt = FlatWeights(new.buffer[: middle.offset + 4], new.specs)  # right names; the data ends mid-model
    with pytest.raises(PartialLoadError, match="loading weights version 6 failed part-way"):
        engine.load_weights(corrupt, version=6)
    assert engine.weights_version() == STALE
    with pytest.raises(PartialLoadError, match="refuses to generate"):
        engine.generate(PROMPTS, n=1)
    with pytest.raises(PartialLoadError, match="refuses to score"):
        engine.score(_one_row())
    with pytest.raises(WeightMismatchError, match="engine stays stale"):
        engine.load_weights(_without(new, "model.norm.weight"), version=7)
    model, complete = random_weights(engine.model_dir, seed=45)
    assert engine.load_weights(complete, version=7) == 7
    assert _greedy_matches(engine, model)


@pytest.mark.vllm
def test_worker_checks_every_parameter_was_written(engine):
    """Past the engine's check (called directly), a parameter vLLM never wrote is named, not just logged."""
    _, new = random_weights(engine.model_dir, seed=46)
    with pytest.raises(PartialLoadError, match=r"parameters not written \(1\): model\.norm\.weight"):
        engine.llm.collective_rpc("warp_load_flat", args=(_without(new, "model.norm.weight"),))
    model, complete = random_weights(engine.model_dir, seed=47)
    assert engine.load_weights(complete, version=8) == 8
    assert _greedy_matches(engine, model)


@pytest.mark.vllm
def test_refused_broadcast_is_drained_and_the_group_still_works(engine):
    from actors.broadcast import BroadcastSender, specs_to_wire

    model, flat = random_weights(engine.model_dir, seed=48)
    engine.load_weights(flat, version=8)
    bucket = 256 << 10  # the tiny model (1.4 MB) in several buckets
    sender = BroadcastSender("127.0.0.1", world_size=2, backend="gloo", bucket_bytes=bucket, timeout_s=60)
    connect = threading.Thread(target=sender.connect)
    connect.start()
    engine.join_weight_group(*sender.address, 1, 2, "gloo", 60)
    connect.join(timeout=60)
    renamed = _renamed(random_weights(engine.model_dir, seed=49)[1], *RENAMED)
    new_model, new = random_weights(engine.model_dir, seed=50)
    try:
        for weights, version in ((renamed, 9), (new, 10)):
            tensors = [(name, t.clone()) for name, t in weights.tensors()]
            send = threading.Thread(target=sender.send, args=(weights.specs, tensors))
            send.start()
            if weights is renamed:
                with pytest.raises(WeightMismatchError, match=RENAMED[1].replace(".", r"\.")):
                    engine.receive_weights(specs_to_wire(weights.specs), bucket, version)
                assert engine.weights_version() == 8 and _greedy_matches(engine, model)
            else:
                assert engine.receive_weights(specs_to_wire(weights.specs), bucket, version) == 10
            send.join(timeout=60)
            assert not send.is_alive()  # the sender finished: the refusing engine drained the broadcast
            assert engine.last_receive_stats()[0]["buckets"] > 1
        assert sender.broadcasts == 2
        assert _greedy_matches(engine, new_model)
    finally:
        engine.llm.collective_rpc("warp_leave_group")
        sender.close()


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir, actors_cfg):
    from actors.pool import ActorPool

    pool = ActorPool(tiny_model_dir, actors_cfg, dtype="float32", seed=0)
    yield pool
    pool.shutdown()


@pytest.mark.ray
@pytest.mark.vllm
def test_pool_refuses_a_renamed_source_and_keeps_the_previous_version(pool):
    from actors.pool import PoolError

    model, flat = random_weights(pool.model_dir, seed=51)
    pool.sync(flat, version=3)
    engine = pool.engines[0]
    with pytest.raises(PoolError, match=r"refused weights version 4: .*" + RENAMED[1].replace(".", r"\.")):
        pool.sync(_renamed(random_weights(pool.model_dir, 52)[1], *RENAMED), version=4)
    assert pool.engines[0] is engine  # refused before writing: nothing to replace
    assert pool.versions() == [3] and pool.version == 3
    table = pool.generate(PROMPTS, n=1, temperature=0.0)
    assert set(table.column("version").to_pylist()) == {3}
    assert all(row["completion_ids"] == hf_greedy(model, row["prompt_ids"]) for row in table.to_pylist())


@pytest.mark.ray
@pytest.mark.vllm
def test_pool_replaces_a_stale_engine_once_then_fails(pool):
    """A corrupt source passes the name check but fails part-way: one replacement, then PoolError, no loop."""
    from actors.pool import PoolError

    _, flat = random_weights(pool.model_dir, seed=53)
    corrupt = FlatWeights(flat.buffer[: flat.specs[5].offset + 4], flat.specs)
    engine = pool.engines[0]
    with pytest.raises(PoolError, match="replacement engine 0 failed to start or to load weights version 5"):
        pool.sync(corrupt, version=5)
    assert pool.engines[0] is not engine
    assert pool._restarts == 1
    model, complete = random_weights(pool.model_dir, seed=54)
    pool.sync(complete, version=6)  # a complete source brings the replacement into service
    assert pool.versions() == [6]
    table = pool.generate(PROMPTS, n=1, temperature=0.0)
    assert all(row["completion_ids"] == hf_greedy(model, row["prompt_ids"]) for row in table.to_pylist())
