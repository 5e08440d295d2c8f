"""Every learner layout a recipe can ship takes the same steps: ZeRO 0-3 × R ∈ {1, 2} × {fp32, bf16} × LoRA on/off,
ZeRO-3 at DeepSpeed's default persistence threshold and at one that splits the model's tensors on both sides of it.

Each layout trains 3 steps from θ_init on the same rollouts and is compared with the ZeRO-0, R = 1 learner of the
same dtype and LoRA setting: per-step metrics, the fp32 master policy, the EMA accumulators, the parameters the
anchor's forward actually reads (gathered, persistent ones included) and its log-probabilities of a probe batch.

Tolerances, from measurements on this machine (the figures are in learners/README of the issue notes):
- fp32: layouts differ only in reduction order, which Adam's per-element normalisation amplifies on near-zero
  gradients: measured ≤ 2.1e-4 of the update's norm. The bugs this test exists for measured 7.2e-3 (policy, a
  stale ZeRO-3 anchor) and 1.0 (the anchor's persistent tensors never moving). Bound: 1e-3.
- bf16: each layout rounds differently. The reference bf16 learner's own update is 0.057 away from the fp32
  learner's (its rounding noise, measured in the same run); a layout passes when its update is no farther from
  the fp32 learner's than 1.5× that, i.e. it is as exact as the reference bf16 path, and its anchor module is as
  close to its own fp32 accumulators as the reference's is to its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.learners.conftest import make_rollouts
from tests.learners.parity import Layout, ParityPool, relative_gap

BATCHES = [make_rollouts(groups=3, samples=4, seed=s) for s in (11, 12, 13)]  # uneven over 2 ranks: 2 + 1 groups
PROBE = make_rollouts(groups=2, samples=2, seed=99)
SPLIT = 20_000  # the tiny model's tensors: 65,536 and 32,768 elements above it; 16,384, 8,192 and 128 below
DEFAULT = 100_000  # DeepSpeed's, and the 7B recipe's: every tensor of the tiny model stays whole (persistent)

FULL = [Layout(stage, ranks, dtype) for dtype in ("float32", "bfloat16") for stage in (0, 1, 2, 3) for ranks in (1, 2)]
FULL += [Layout(3, ranks, dtype, threshold=SPLIT) for dtype in ("float32", "bfloat16") for ranks in (1, 2)]
LORA = [
    Layout(stage, ranks, dtype, lora=4) for dtype in ("float32", "bfloat16") for stage in (0, 1, 2) for ranks in (1, 2)
]  # fmt: skip  (LoRA with ZeRO-3 is refused by the config)
FP32_BOUND = 1e-3
BF16_FACTOR = 1.5


def _reference(layout: Layout, dtype: str | None = None) -> Layout:
    return Layout(0, 1, dtype or layout.dtype, lora=layout.lora)


@pytest.fixture(scope="module")
def pool(ray_cluster):
    pool = ParityPool()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def outcomes(pool, tiny_model_dir) -> dict:
    return {layout: pool.run(tiny_model_dir, layout, BATCHES, PROBE) for layout in FULL + LORA}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("layout", [x for x in FULL + LORA if x.dtype == "float32"], ids=lambda x: x.name)
def test_fp32_layouts_take_the_reference_steps(outcomes, layout) -> None:
    run, ref = outcomes[layout], outcomes[_reference(layout)]
    # What the anchor's forward reads (anchor_module), persistent ZeRO-3 tensors included, moves as the reference's
    # accumulators do.
    gaps = {part: relative_gap(getattr(run, part), getattr(ref, "anchor" if part == "anchor_module" else part),
                               getattr(ref, "start_policy" if part == "policy" else "start_anchor"))
            for part in ("policy", "anchor", "anchor_module")}  # fmt: skip
    assert max(gaps.values()) <= FP32_BOUND, gaps
    np.testing.assert_allclose(run.anchor_logp, ref.anchor_logp, atol=1e-4)
    for mine, theirs in zip(run.metrics, ref.metrics, strict=True):
        assert not mine["skipped"] and mine["sequences"] == theirs["sequences"] == 12
        for key in ("reward", "kl", "entropy", "loss", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key
    assert run.adapter_tensors == (2 * 2 * 2 if layout.lora else 0)  # 2 layers × (q, v) × (A, B)
    moved = relative_gap(ref.start_anchor, ref.anchor, ref.start_anchor)  # = 1: the anchor moved at all
    assert moved == pytest.approx(1.0)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("layout", [x for x in FULL + LORA if x.dtype == "bfloat16"], ids=lambda x: x.name)
def test_bf16_layouts_are_as_exact_as_the_reference(outcomes, layout) -> None:
    run, ref, exact = outcomes[layout], outcomes[_reference(layout)], outcomes[_reference(layout, "float32")]
    for part in ("policy", "anchor"):
        target, target_start = getattr(exact, part), getattr(exact, f"start_{part}")
        noise = relative_gap(getattr(ref, part), target, target_start, getattr(ref, f"start_{part}"))
        mine = relative_gap(getattr(run, part), target, target_start, getattr(run, f"start_{part}"))
        assert 0 < noise < 0.2, f"{part}: {noise}"  # bf16 rounding, not a broken reference
        assert mine <= BF16_FACTOR * noise, f"{part}: {mine} from the fp32 learner's update, reference {noise}"
    # The anchor's forward reads its accumulators rounded to bf16: as close to them as the reference's are.
    assert run.adapter_tensors == (2 * 2 * 2 if layout.lora else 0)  # 2 layers × (q, v) × (A, B)
    held = relative_gap(run.anchor_module, run.anchor, run.start_anchor)
    expected = relative_gap(ref.anchor_module, ref.anchor, ref.start_anchor)
    assert held <= BF16_FACTOR * expected, f"anchor module {held} from its accumulators, reference {expected}"
    np.testing.assert_allclose(run.anchor_logp, ref.anchor_logp, atol=3e-2)
    for mine, theirs in zip(run.metrics, ref.metrics, strict=True):
        assert not mine["skipped"] and mine["sequences"] == theirs["sequences"] == 12
        assert mine["kl"] == pytest.approx(theirs["kl"], abs=1e-2)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=2e-2, abs=1e-2)


# A bf16 step at lr 2e-5 moves the fp32 masters by about 2e-5, below half a bf16 ulp of most of the tiny model's
# weights (~0.02: ulp 1.2e-4): the bf16 weights barely move, and an EMA of them would barely move either.
TRACED = [Layout(stage, ranks, "bfloat16", lr=2e-5) for stage in (0, 1, 2, 3) for ranks in (1, 2)]
TRACED += [Layout(stage, ranks, "bfloat16", lora=4, lr=2e-5) for stage in (0, 1, 2) for ranks in (1, 2)]
MU = 0.5


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("layout", TRACED, ids=lambda x: x.name)
def test_bf16_ema_follows_the_fp32_masters(pool, tiny_model_dir, layout) -> None:
    """θ_ema ← (1 − μ)θ_ema + μθ with θ the optimizer's fp32 masters (LoRA: the factors' masters), at every stage."""
    run = pool.run(tiny_model_dir, layout, BATCHES, PROBE, mu=MU, trace=True)
    expected = {n: t.astype(np.float64) for n, t in run.start_anchor.items()}
    from_rounded = dict(expected)
    for masters, rounded in zip(run.masters, run.rounded, strict=True):
        expected = {n: (1 - MU) * e + MU * masters[n] for n, e in expected.items()}
        from_rounded = {n: (1 - MU) * e + MU * rounded[n] for n, e in from_rounded.items()}
    exact = relative_gap(run.anchor, expected, run.start_anchor)
    assert exact <= 1e-4, f"the EMA is {exact} of its movement from the masters' EMA"
    # The test can fail: an EMA of the bf16 weights lands far from the masters' EMA at this learning rate.
    assert relative_gap(from_rounded, expected, run.start_anchor) > 0.1
