"""ActorPool of 2 engines on a local Ray cluster, object-store transport: order, sync, engine death."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from actors.pool import ActorPool, PoolError

from .conftest import PROMPTS, hf_greedy, random_weights

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
LONG = 96  # new tokens: makes a generate call last long enough to be killed in the middle


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir, actors_cfg):
    pool = ActorPool(tiny_model_dir, dataclasses.replace(actors_cfg, engines_per_run=2), dtype="float32", seed=0)
    yield pool
    pool.shutdown()


def _assert_greedy_matches(table, model):
    for row in table.to_pylist():
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"]), row["prompt"]


def test_generate_splits_and_keeps_prompt_order(pool):
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS + PROMPTS[:1])]  # 5 prompts over 2 engines
    table = pool.generate(prompts, n=2, step=4)
    assert table.column("prompt").to_pylist() == [p for p in prompts for _ in range(2)]
    assert table.column("group_id").to_pylist() == [g for g in range(5) for _ in range(2)]
    assert set(table.column("step").to_pylist()) == {4}


def test_sync_from_one_object_ref_loads_every_engine(pool, ray_cluster):
    model, flat = random_weights(pool.model_dir, seed=11)
    pool.sync(ray_cluster.put(flat), version=3)  # the learner puts once; engines read zero-copy
    assert pool.versions() == [3, 3]
    table = pool.generate(PROMPTS, n=1, temperature=0.0)
    assert set(table.column("version").to_pylist()) == {3}
    _assert_greedy_matches(table, model)


def test_engine_killed_mid_run_is_replaced_with_latest_weights(pool, ray_cluster):
    model, flat = random_weights(pool.model_dir, seed=12)
    pool.sync(flat, version=4)
    victim = pool.engines[0]
    prompts = [f"{p} {i}" for i in range(16) for p in PROMPTS]
    result = {}
    run = lambda: result.update(table=pool.generate(prompts, n=1, temperature=0.0, max_new_tokens=LONG))  # seconds
    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.2)
    ray_cluster.kill(victim, no_restart=True)
    worker.join(timeout=240)
    table = result["table"]
    assert pool.engines[0] is not victim
    assert table.column("group_id").to_pylist() == list(range(len(prompts)))
    assert set(table.column("version").to_pylist()) == {4}
    for row in table.slice(0, 4).to_pylist():  # engine 0's shard: made by the replacement's weights
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"], LONG)
    assert pool.versions() == [4, 4]


def test_second_failure_is_an_error(pool, ray_cluster, monkeypatch):
    monkeypatch.setattr(pool, "model_dir", "/nonexistent/model")  # the replacement cannot start
    ray_cluster.kill(pool.engines[1], no_restart=True)
    with pytest.raises(PoolError, match="engine 1"):
        pool.generate(PROMPTS, n=1)
