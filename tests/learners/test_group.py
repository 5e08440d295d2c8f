"""LearnerGroup on a local Ray cluster: R ranks act as one learner (gloo on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.learners.conftest import make_rollouts
from warp_rlhf.config import LearnersConfig

pytestmark = pytest.mark.ray


def group_weights_after_steps(model_dir, ranks: int, batches, tmp_path=None):
    from learners.group import LearnerGroup

    # Micro-batches of 4 = one prompt group: the 1-rank learner accumulates over 4 micro-batches,
    # each of the 2 ranks over 2, and DeepSpeed averages over ranks in between.
    cfg = LearnersConfig(ranks=ranks, num_cpus=1, zero_stage=2, lr=1e-3, warmup_steps=0, micro_batch_size=4)
    group = LearnerGroup(model_dir, cfg, beta=0.1, mu=0.5, dtype="float32", seed=0)
    try:
        init = group.weights()
        metrics = [group.step(batch) for batch in batches]
        after = group.weights()
        if tmp_path is not None:
            group.save_state(tmp_path / "state")
            assert (tmp_path / "state" / "learner.json").is_file()
            assert [p.name for p in tmp_path.iterdir()] == ["state"]  # written aside, renamed into place
        return init, metrics, after
    finally:
        group.shutdown()


def test_one_and_two_ranks_give_the_same_weights(ray_cluster, tiny_model_dir, tmp_path):
    # The second batch has 3 prompts: one rank gets 2 micro-batches, the other 1 plus an empty one.
    batches = [make_rollouts(groups=4, samples=4, seed=3), make_rollouts(groups=3, samples=4, seed=4)]
    init1, metrics1, after1 = group_weights_after_steps(tiny_model_dir, 1, batches)
    init2, metrics2, after2 = group_weights_after_steps(tiny_model_dir, 2, batches, tmp_path)
    assert init1.names() == init2.names() and np.array_equal(init1.buffer, init2.buffer)
    assert not np.array_equal(after1.buffer, init1.buffer)
    # Summation order differs between the layouts; Adam's update lr·m/(√v+ε) magnifies that only
    # where |g| ≈ ε, so the weights agree to a small fraction of one update (lr = 1e-3).
    for (name, a), (_, b) in zip(after1.tensors(), after2.tensors(), strict=True):
        assert float((a - b).abs().max()) <= 1e-5, name
    for m1, m2 in zip(metrics1, metrics2, strict=True):
        assert m1["sequences"] == m2["sequences"] and m1["tokens"] == m2["tokens"] and not m2["skipped"]
        for key in ("reward", "kl", "entropy", "loss", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
