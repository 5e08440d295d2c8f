"""Weight transports: the bucket plan, a streamed gloo broadcast, and a 2-engine pool fed by a real learner's rank 0."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest

from actors.broadcast import BroadcastSender, ReceiveStats, bucket_plan, open_group, receive_stream
from merger.flat import TensorSpec, allocate

from .conftest import PROMPTS, hf_greedy, random_weights

BUCKET_MB = 0.25  # the tiny model (1.4 MB) then travels in 6 buckets


def _specs(sizes: list[int]) -> tuple[TensorSpec, ...]:
    return allocate((f"t{i}", "uint8", (n,), n) for i, n in enumerate(sizes)).specs


def test_bucket_plan_keeps_tensors_whole_and_buckets_bounded():
    specs = _specs([300, 300, 500, 1200, 100, 100])
    plan = bucket_plan(specs, bucket_bytes=1000)
    assert [[s.name for s in bucket] for bucket in plan] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [s for bucket in plan for s in bucket] == list(specs)  # every tensor once, in order
    assert all(sum(s.nbytes for s in b) <= 1000 or len(b) == 1 for b in plan)  # only a lone big tensor exceeds


def test_streamed_broadcast_delivers_every_tensor_within_two_buckets():
    rng = np.random.default_rng(0)
    sizes = [700, 900, 2500, 300, 800, 650]
    specs = _specs(sizes)
    data = {s.name: rng.integers(0, 256, size=s.nbytes, dtype=np.uint8) for s in specs}
    sender = BroadcastSender("127.0.0.1", world_size=2, backend="gloo", bucket_bytes=1000, timeout_s=30)
    received, stats = {}, ReceiveStats()

    def receiver():
        group = open_group(*sender.address, rank=1, world_size=2, backend="gloo", timeout_s=30)
        for name, tensor in receive_stream(group, specs, 1000, stats):
            received[name] = tensor.numpy().copy()  # consumed like vLLM's loader: copied, then dropped

    thread = threading.Thread(target=receiver)
    thread.start()
    sender.connect()
    import torch

    sender.send(specs, ((name, torch.from_numpy(array)) for name, array in data.items()))
    thread.join(timeout=30)
    sender.close()
    for name, array in data.items():
        np.testing.assert_array_equal(received[name], array)
    assert stats.received_bytes == sum(sizes) and stats.buckets == len(bucket_plan(specs, 1000))
    assert stats.largest_bucket == 2500  # the lone big tensor
    # The current bucket plus what the consumer still holds views of (at most the two before it here,
    # where one bucket is a lone 2500-byte tensor): never the whole model.
    assert stats.peak_bytes <= 2500 + 2 * 1000 < sum(sizes)
    assert stats.live_bytes == 0


def test_sender_refuses_tensors_out_of_plan():
    import torch

    specs = _specs([10, 10])
    sender = BroadcastSender("127.0.0.1", world_size=1, backend="gloo", bucket_bytes=100, timeout_s=10)
    sender.connect()
    with pytest.raises(RuntimeError, match="out of order"):
        sender.send(specs, [("t1", torch.zeros(10, dtype=torch.uint8)), ("t0", torch.zeros(10, dtype=torch.uint8))])


@pytest.fixture(scope="module")
def learner_and_pool(ray_cluster, tiny_model_dir, actors_cfg):
    """A real 2-rank ZeRO-3 learner (rank 0 sends; both gather) and a 2-engine pool on the collective transport.

    The persistence threshold splits the tiny model's tensors: the larger ones are gathered for every send, by both
    ranks together, so a rank that stops gathering part-way leaves the other waiting (the case the fallback must
    survive). A short broadcast timeout turns such a wait into a failure within the test's time.
    """
    from actors.pool import ActorPool
    from learners.group import LearnerGroup
    from warp_rlhf.config import LearnersConfig

    learners = LearnersConfig(ranks=2, zero_stage=3, zero3_persistence_threshold=20_000, num_cpus=1, warmup_steps=0)
    learner = LearnerGroup(tiny_model_dir, learners, beta=0.1, mu=0.01, dtype="float32")
    cfg = dataclasses.replace(actors_cfg, weight_transport="collective", bucket_mb=BUCKET_MB, engines_per_run=2,
                              broadcast_timeout_s=60)  # fmt: skip
    pool = ActorPool(tiny_model_dir, cfg, dtype="float32", seed=0)
    learner.ready()
    yield learner, pool
    pool.shutdown()
    learner.shutdown()


def _learner_holds(learner, model_dir, seed):
    model, flat = random_weights(model_dir, seed=seed)
    learner.load_init(flat)
    return model, flat


@pytest.mark.ray
@pytest.mark.vllm
def test_learner_rank0_broadcasts_to_every_engine(learner_and_pool, tiny_model_dir):
    import ray

    learner, pool = learner_and_pool
    for version, seed in ((7, 21), (8, 22)):  # the second sync reuses the group
        model, flat = _learner_holds(learner, tiny_model_dir, seed)
        pool.sync(learner, version=version)
        assert pool.versions() == [version, version]
        table = pool.generate(PROMPTS, n=1, temperature=0.0)
        assert set(table.column("version").to_pylist()) == {version}
        for row in table.to_pylist():
            assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"])
    sender = learner.sender_info()
    rank0_pid = ray.get(learner.ranks[0].__ray_call__.remote(lambda _self: os.getpid()))
    assert sender["pid"] == rank0_pid != os.getpid()  # the learner sent, not this (driver) process
    assert sender["broadcasts"] == 2 and sender["address"].startswith(learner.master_addr + ":")
    # Streamed: every engine worker held at most about two buckets beside its model, never the model.
    bucket = int(BUCKET_MB * (1 << 20))
    for stats in ray.get([e.last_receive_stats.remote() for e in pool.engines]):
        (worker,) = stats
        assert worker["bytes"] == sum(spec.nbytes for spec in flat.specs)
        assert worker["buckets"] >= 5 and worker["largest_bucket"] <= bucket
        assert worker["peak_bytes"] <= 2 * bucket < flat.nbytes


@pytest.mark.ray
@pytest.mark.vllm
def test_collective_sync_survives_a_dead_engine(learner_and_pool, tiny_model_dir, ray_cluster):
    """The broadcast breaks at its first bucket; rank 0 still takes part in rank 1's remaining gathers, so the
    object-store fallback (a collective of both ranks) and everything after it find the ranks in step."""
    from tests.learners.conftest import make_rollouts

    learner, pool = learner_and_pool
    _, flat = _learner_holds(learner, tiny_model_dir, 23)
    ray_cluster.kill(pool.engines[1], no_restart=True)
    pool.sync(learner, version=9)  # broken broadcast: replace, reload through the object store
    assert pool.versions() == [9, 9]
    assert learner.weights().buffer.tobytes() == flat.buffer.tobytes()  # both ranks gathered the same tensors
    learner.step(make_rollouts(groups=2, samples=2), timeout_s=120)  # a step's gathers are in step too
    model, _ = _learner_holds(learner, tiny_model_dir, 24)
    pool.sync(learner, version=10)  # the group is re-formed with the new engine
    table = pool.generate(PROMPTS, n=1, temperature=0.0)
    for row in table.to_pylist():
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"])


@pytest.mark.ray
@pytest.mark.vllm
def test_a_broadcast_broken_mid_way_leaves_the_ranks_in_step(learner_and_pool, tiny_model_dir):
    """Rank 0's send fails before its third bucket, part-way through the tensors both ranks gather: rank 0 still
    gathers the rest with rank 1, the object-store fallback then gathers on both, and the engines get the weights."""
    import ray

    from actors.broadcast import FAULT_BUCKET_ENV
    from tests.learners.conftest import make_rollouts

    learner, pool = learner_and_pool
    model, flat = _learner_holds(learner, tiny_model_dir, 25)

    def set_fault(_self, value):
        os.environ.pop(FAULT_BUCKET_ENV, None) if value is None else os.environ.update({FAULT_BUCKET_ENV: value})

    ray.get(learner.ranks[0].__ray_call__.remote(set_fault, "3"))
    try:
        pool.sync(learner, version=11)
    finally:
        ray.get(learner.ranks[0].__ray_call__.remote(set_fault, None))
    assert pool.versions() == [11, 11]
    table = pool.generate(PROMPTS, n=1, temperature=0.0)
    for row in table.to_pylist():
        assert row["completion_ids"] == hf_greedy(model, row["prompt_ids"])
    assert learner.weights().buffer.tobytes() == flat.buffer.tobytes()
    learner.step(make_rollouts(groups=2, samples=2), timeout_s=120)
    pool.sync(learner, version=12)  # and the collective path works again
    assert pool.versions() == [12, 12]
