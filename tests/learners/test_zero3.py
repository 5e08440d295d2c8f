"""Learners at scale: ZeRO-3 with a partitioned EMA anchor on 1 and 2 ranks, no deadlock, fp32 task vectors.

Every ZeRO-3 learner here sets ``zero3_persistence_threshold = 0``: every tensor of the tiny model is below
DeepSpeed's default threshold (1e5 elements), so ZeRO-3 would partition nothing and no forward would
gather; with 0, every parameter (policy and anchor) is split over the ranks and every forward is a
collective, which is what these tests are about.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.learners.conftest import make_rollouts
from warp_rlhf.config import LearnersConfig

# Uneven on purpose: 3 prompt groups of 4 over 2 ranks with micro-batches of 2 sequences: one rank
# holds 2 groups (4 micro-batches), the other 1 (2), and each group is cut over two micro-batches,
# which, with the batch-mean baseline, needs the advantage pre-pass: the case that used to deadlock.
BATCHES = [make_rollouts(groups=3, samples=4, seed=s) for s in (11, 12, 13)]
PROBE = make_rollouts(groups=2, samples=2, seed=99)


def _cfg(stage: int, ranks: int) -> LearnersConfig:
    return LearnersConfig(ranks=ranks, num_cpus=1, zero_stage=stage, lr=1e-3, warmup_steps=0, micro_batch_size=2,
                          baseline="mean", zero3_persistence_threshold=0)  # fmt: skip


def _anchor_logprobs(rank, table) -> np.ndarray:
    """Run inside a rank (every rank: the ZeRO-3 anchor's forward gathers): log π_ema of a probe batch."""
    from actors.rollout import to_tensors

    batch = to_tensors(table, rank.pad_id)
    with torch.no_grad():
        logp = rank.anchor.sequence_logprobs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return logp.cpu().numpy()


def _train(model_dir, stage: int, ranks: int) -> dict:
    import ray

    from learners.group import LearnerGroup

    group = LearnerGroup(model_dir, _cfg(stage, ranks), beta=0.1, mu=0.3, dtype="float32", seed=0)
    try:
        group.ready()
        metrics = []
        for batch in BATCHES:
            metrics.append(group.step(batch, timeout_s=300))  # a deadlock fails here instead of hanging CI
        calls = [r.__ray_call__.remote(lambda self: self.anchor.gathered()) for r in group.ranks]  # collective
        ema = ray.get(calls, timeout=120)[0]
        logps = ray.get([r.__ray_call__.remote(_anchor_logprobs, PROBE) for r in group.ranks], timeout=120)
        anchor_bytes = ray.get([r.__ray_call__.remote(lambda self: self.anchor.local_bytes()) for r in group.ranks])
        kinds = ray.get([r.__ray_call__.remote(lambda self: type(self.anchor).__name__) for r in group.ranks])
        return {"metrics": metrics, "ema": ema, "logp": logps[0], "bytes": anchor_bytes, "kinds": kinds,
                "weights": group.weights()}  # fmt: skip
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_dir) -> dict:
    return {key: _train(tiny_model_dir, *key) for key in ((0, 1), (3, 1), (3, 2))}


@pytest.mark.ray
@pytest.mark.slow
def test_partitioned_anchor_matches_the_full_anchor(runs) -> None:
    reference = runs[(0, 1)]
    assert reference["kinds"] == ["EmaAnchor"]
    for key in ((3, 1), (3, 2)):
        run = runs[key]
        assert set(run["kinds"]) == {"PartitionedAnchor"}
        for name, ema in reference["ema"].items():
            torch.testing.assert_close(run["ema"][name], ema, atol=2e-5, rtol=1e-4, msg=f"{key} {name}")
        np.testing.assert_allclose(run["logp"], reference["logp"], atol=1e-3, rtol=1e-5)
        moved = max(float((reference["ema"][n] - t).abs().max()) for n, t in reference["weights"].tensors())
        assert moved > 1e-4  # the EMA really moved away from the policy's start (so equality means something)


@pytest.mark.ray
@pytest.mark.slow
def test_partitioned_anchor_holds_half_the_bytes_on_two_ranks(runs) -> None:
    (one,) = runs[(3, 1)]["bytes"]
    two = runs[(3, 2)]["bytes"]
    full = runs[(0, 1)]["bytes"][0]
    assert one == pytest.approx(full, rel=0.02)  # fp32: the accumulator is the module's own shard, no copy
    for per_rank in two:
        assert per_rank == pytest.approx(one / 2, rel=0.05)  # halves, up to ZeRO's per-tensor padding


@pytest.mark.ray
@pytest.mark.slow
def test_uneven_zero3_batches_finish_and_match_one_rank(runs) -> None:
    """Ranks held 4 and 2 micro-batches, groups cut across micro-batches, batch-mean baseline: no deadlock."""
    one, two = runs[(3, 1)], runs[(3, 2)]
    for m1, m2 in zip(one["metrics"], two["metrics"], strict=True):
        assert not m1["skipped"] and not m2["skipped"]
        assert m1["sequences"] == m2["sequences"] == 12 and m1["tokens"] == m2["tokens"]
        for key in ("reward", "kl", "entropy", "loss", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-5), key
    for (name, a), (_, b) in zip(one["weights"].tensors(), two["weights"].tensors(), strict=True):
        assert float((a - b).abs().max()) <= 1e-5, name


@pytest.mark.parametrize("stage", [0, 2, 3])  # masters: DeepSpeed's FP16 optimizer (0), ZeRO's partitions (2, 3)
@pytest.mark.ray
def test_final_policy_is_fp32_master_weights_and_merges_like_float64(ray_cluster, tiny_model_dir, tmp_path, stage):
    """bf16 training at a small lr: the bf16 weights barely move, the fp32 masters do; SLERP uses the masters, its
    θ_init stays fp32, and the learner starts the next iteration from exactly that in its masters."""
    from learners.group import LearnerGroup
    from merger.service import Merger
    from warp_rlhf.config import config_from_dict
    from warp_rlhf.models import resolve_model

    bf16_dir = resolve_model("tiny-llama", dtype="bfloat16")
    cfg = LearnersConfig(num_cpus=1, zero_stage=stage, lr=2e-5, warmup_steps=0, micro_batch_size=8)
    # A Ray actor, not this process: in-process learners of other tests leave process groups behind.
    learner = LearnerGroup(bf16_dir, cfg, beta=0.1, mu=0.01, dtype="bfloat16", seed=0)
    try:
        init = learner.weights()
        policies, rounded = [], []
        for seed in (1, 2):
            learner.load_init(init)
            for s in range(3):
                learner.step(make_rollouts(groups=4, samples=4, seed=10 * seed + s))
            policies.append(learner.weights(master=True))
            rounded.append(learner.weights())
        run = config_from_dict({"warp": {"eta": 0.3}, "output": {"dir": str(tmp_path / "run")}})
        new_init = Merger(run, tiny_model_dir).merge(1, init, policies)
        learner.load_init(new_init)
        assert np.array_equal(learner.weights(master=True).buffer, new_init.buffer)  # not its bf16 rounding
    finally:
        learner.shutdown()
    assert {s.dtype for s in policies[0].specs} == {"float32"} and {s.dtype for s in init.specs} == {"bfloat16"}
    theta0 = {n: t.double() for n, t in init.tensors()}
    deltas = [{n: t.double() - theta0[n] for n, t in p.tensors()} for p in policies]
    rounded_deltas = [{n: t.double() - theta0[n] for n, t in p.tensors()} for p in rounded]
    total = sum(float(d.abs().sum()) for d in deltas[0].values())
    lost = sum(float((d - r).abs().sum()) for d, r in zip(deltas[0].values(), rounded_deltas[0].values(), strict=True))
    assert lost > 0.1 * total  # bf16 rounding would have thrown away a large part of the task vector

    assert {s.dtype for s in new_init.specs} == {"float32"}
    for name, merged in new_init.tensors():
        d1, d2 = deltas[0][name].flatten(), deltas[1][name].flatten()
        c1, c2 = _slerp_pair(d1, d2, lam=0.5)
        reference = theta0[name] + 0.3 * (c1 * deltas[0][name] + c2 * deltas[1][name])  # float64 LITI of SLERP
        # fp32 maths and an fp32 result: a few fp32 ulps of the weight, no bf16 rounding.
        assert bool(((merged.double() - reference).abs() <= 1e-6 * reference.abs().clamp(min=1e-3)).all()), name


def _slerp_pair(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> tuple[float, float]:
    n1, n2 = float(d1.norm()), float(d2.norm())
    if n1 == 0 or n2 == 0:
        return 1 - lam, lam
    omega = float(torch.arccos(torch.clamp(d1 @ d2 / (n1 * n2), -1, 1)))
    if np.sin(omega) < 1e-3:
        return 1 - lam, lam
    return float(np.sin((1 - lam) * omega) / np.sin(omega)), float(np.sin(lam * omega) / np.sin(omega))
