"""Weight transports: bucketed gloo broadcast, and a 2-engine pool synced through the collective transport."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from actors.transport import WeightSender, open_group, receive_buffer
from merger.flat import FlatWeights, TensorSpec

from .conftest import PROMPTS, hf_greedy, random_weights


def test_bucketed_broadcast_delivers_every_byte():
    data = np.random.default_rng(0).integers(0, 256, size=10_007, dtype=np.uint8)
    weights = FlatWeights(data, (TensorSpec("w", "uint8", (10_007,), 0, 10_007),))
    sender = WeightSender(world_size=2, bucket_bytes=1000, timeout_s=30)
    received = {}

    def receiver():
        group = open_group(*sender.address, rank=1, world_size=2, backend="gloo", timeout_s=30)
        received["buffer"] = receive_buffer(group, weights.nbytes, bucket_bytes=1000).numpy()

    thread = threading.Thread(target=receiver)
    thread.start()
    sender.connect()
    sender.send(weights)
    thread.join(timeout=30)
    sender.close()
    np.testing.assert_array_equal(received["buffer"], data)


@pytest.fixture(scope="module")
def collective_pool(ray_cluster, tiny_model_dir, actors_cfg):
    import dataclasses

    from actors.pool import ActorPool

    cfg = dataclasses.replace(actors_cfg, weight_transport="collective", bucket_mb=1, engines_per_run=2)
    pool = ActorPool(tiny_model_dir, cfg, dtype="float32", seed=0)
    yield pool
    pool.shutdown()


@pytest.mark.ray
@pytest.mark.vllm
def test_collective_sync_matches_transformers(collective_pool):
    for version, seed in ((7, 21), (8, 22)):  # the second sync reuses the group
        model, flat = random_weights(collective_pool.model_dir, seed=seed)
        collective_pool.sync(flat, version=version)
        assert collective_pool.versions() == [version, version]
        table = collective_pool.generate(PROMPTS, n=1, temperature=0.0)
        assert set(table.column("version").to_pylist()) == {version}
        for row in table.to_pylist():
            assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"])


@pytest.mark.ray
@pytest.mark.vllm
def test_collective_sync_survives_a_dead_engine(collective_pool, ray_cluster):
    model, flat = random_weights(collective_pool.model_dir, seed=23)
    ray_cluster.kill(collective_pool.engines[1], no_restart=True)
    collective_pool.sync(flat, version=9)  # broken broadcast: replace, reload through the object store
    assert collective_pool.versions() == [9, 9]
    model, flat = random_weights(collective_pool.model_dir, seed=24)
    collective_pool.sync(flat, version=10)  # the group is re-formed with the new engine
    table = collective_pool.generate(PROMPTS, n=1, temperature=0.0)
    for row in table.to_pylist():
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"])
