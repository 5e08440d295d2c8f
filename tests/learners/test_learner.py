"""LearnerRank in-process (world size 1) on the tiny model: ZeRO 0 and 2 here, ZeRO 3 under `slow`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.learners.conftest import make_rollouts
from warp_rlhf.config import LearnersConfig

CONFIGS = [
    pytest.param((0, "float32"), id="zero0-fp32"),
    pytest.param((2, "bfloat16"), id="zero2-bf16"),
    pytest.param((3, "float32"), id="zero3-fp32", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CONFIGS)
def learner(request, tiny_model_dir):
    from learners.learner import LearnerRank

    stage, dtype = request.param
    cfg = LearnersConfig(zero_stage=stage, lr=1e-3, warmup_steps=2, micro_batch_size=8, grad_clip=1.0)
    rank = LearnerRank(tiny_model_dir, cfg, beta=0.1, mu=0.5, dtype=dtype, seed=0)
    rank.init = rank.weights()  # θ_init, restored by every test through load_init
    yield rank
    rank.shutdown()


def flat_equal(a, b) -> bool:
    return a.names() == b.names() and np.array_equal(a.buffer, b.buffer)


def max_diff(a, b) -> float:
    return max(
        float((x.float() - y.float()).abs().max()) for (_, x), (_, y) in zip(a.tensors(), b.tensors(), strict=True)
    )


def test_weights_are_full_hf_named_in_model_dtype(learner, tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    w = learner.init
    assert set(w.names()) == names and "lm_head.weight" not in names  # tied lm_head left out
    expected = torch.float32 if learner.dtype == "float32" else torch.bfloat16
    assert {t.dtype for _, t in w.tensors()} == {expected}
    assert dict(w.tensors())["model.embed_tokens.weight"].shape == (512, 128)


def test_one_rank_without_zero_skips_the_gradient_all_reduce_and_steps_the_same(learner, rollouts):
    """A one-rank ZeRO-0 backward all-reduced its gradients over itself (flatten, reduce, copy back: 1 s of a 9 s
    step); ZeRO 1-2 partition gradients in that call and keep it. Skipping it must not change a step."""
    assert learner.engine.enable_backward_allreduce == (learner.cfg.zero_stage != 0)
    if learner.cfg.zero_stage != 0:
        return
    after = {}
    for reduce in (False, True):
        learner.engine.enable_backward_allreduce = reduce
        learner.load_init(learner.init)
        learner.step(rollouts)
        after[reduce] = learner.weights()
    learner.engine.enable_backward_allreduce = False
    learner.load_init(learner.init)
    assert not flat_equal(after[False], learner.init)
    assert flat_equal(after[False], after[True])


def test_step_updates_weights_and_anchor_and_reports_metrics(learner, rollouts):
    learner.load_init(learner.init)
    first = learner.step(rollouts)
    assert not first["skipped"] and first["kl"] == 0.0  # the anchor starts at the policy
    assert first["sequences"] == 16 and first["tokens"] == sum(len(c) for c in rollouts["completion_ids"].to_pylist())
    assert first["lr"] == pytest.approx(1e-3 / 2)  # first step of a 2-step linear warm-up
    assert np.isfinite([first[k] for k in ("loss", "entropy", "grad_norm", "seconds", "reward")]).all()
    phases = [f"time_{p}_s" for p in ("anchor", "prepass", "forward", "backward", "optimizer", "ema")]
    assert all(first[k] >= 0 for k in phases) and sum(first[k] for k in phases) <= first["seconds"]
    after = learner.weights()
    assert not flat_equal(after, learner.init) and after.version == learner.init.version + 1
    second = learner.step(rollouts)
    assert second["kl"] != 0.0  # the anchor lags the policy by the EMA
    assert second["lr"] == pytest.approx(1e-3)


def test_nan_reward_leaves_weights_untouched_and_is_reported(learner, rollouts, caplog):
    learner.load_init(learner.init)
    learner.step(rollouts)
    before = learner.weights()
    anchor_before = learner.anchor.state_dict()
    poisoned = make_rollouts(rewards=[np.nan] + [0.5] * 15)
    with caplog.at_level("WARNING", logger="learners.learner"):
        metrics = learner.step(poisoned)
    assert metrics["skipped"] and "skipped" in caplog.text
    assert flat_equal(learner.weights(), before)
    assert all(torch.equal(anchor_before[k], v) for k, v in learner.anchor.state_dict().items())
    assert not learner.step(rollouts)["skipped"]  # and the learner carries on


def test_load_init_resets_policy_anchor_and_optimizer(learner, rollouts):
    learner.load_init(learner.init)
    learner.step(rollouts)
    first = learner.weights()
    learner.step(make_rollouts(seed=1))
    learner.load_init(learner.init)
    assert flat_equal(learner.weights(), learner.init)
    assert learner.step(rollouts)["kl"] == 0.0
    # Same weights as the first run's first step: Adam moments, warm-up and anchor were all reset.
    assert max_diff(learner.weights(), first) == 0.0


def test_an_fp32_init_reaches_a_bf16_learners_master_weights_and_anchor_exactly(learner):
    """θ_init from the merger is fp32 (the learners' fp32 masters, merged). A bf16 learner used to train from its
    rounding to bf16: most of a LITI update at RL's learning rates is below bf16's resolution, and was lost."""
    check_fp32_init_is_exact(learner)


def test_an_fp32_init_is_exact_without_zero_in_bf16_too(tiny_model_dir):
    """The demo's learner (ZeRO 0, bf16) keeps its masters in DeepSpeed's bf16 optimizer, not in a ZeRO partition."""
    from learners.learner import LearnerRank

    cfg = LearnersConfig(zero_stage=0, lr=1e-3, warmup_steps=2, micro_batch_size=8)
    rank = LearnerRank(tiny_model_dir, cfg, beta=0.1, mu=0.5, dtype="bfloat16", seed=0)
    try:
        rank.init = rank.weights()
        check_fp32_init_is_exact(rank)
    finally:
        rank.shutdown()


def check_fp32_init_is_exact(learner) -> None:
    from merger.flat import flatten

    torch.manual_seed(0)
    # A move far below bf16's resolution (2^-8 relative), as a LITI update at small lr is.
    wide = flatten(((n, t.float() * (1 + 1e-4 * torch.randn_like(t.float()))) for n, t in learner.init.tensors()), 7)
    learner.load_init(wide)
    try:
        exact = dict(wide.tensors())
        master = dict(learner.weights(master=True).tensors())
        assert all(torch.equal(master[n], t) for n, t in exact.items())  # the masters are the fp32 θ_init, bit for bit
        model = dict(learner.weights().tensors())  # what the engines get: the model-dtype rounding
        assert all(torch.equal(model[n], t.to(model[n].dtype)) for n, t in exact.items())
        anchor = learner.anchor.gathered()
        assert all(torch.equal(anchor[n], t) for n, t in exact.items())  # the EMA's fp32 accumulators too
        if learner.dtype == "bfloat16":
            assert any(not torch.equal(model[n].float(), t) for n, t in exact.items())  # the test can see a rounding
    finally:
        learner.load_init(learner.init)


def test_save_state_then_load_state_continues_like_an_uninterrupted_run(learner, rollouts, tmp_path):
    batches = [make_rollouts(seed=s) for s in (1, 2)]
    learner.load_init(learner.init)
    learner.step(rollouts)
    learner.save_state(tmp_path / "state")
    for b in batches:
        learner.step(b)
    uninterrupted, steps = learner.weights(), learner.steps
    learner.load_init(learner.init)  # wipe everything, then resume
    learner.load_state(tmp_path / "state")
    for b in batches:
        learner.step(b)
    assert learner.steps == steps
    assert max_diff(learner.weights(), uninterrupted) <= 1e-6


def test_micro_batching_and_prepass_match_one_big_micro_batch(learner, rollouts):
    learner.load_init(learner.init)
    learner.step(rollouts)  # micro-batches of 8 = two whole groups each
    reference = learner.weights()
    original = learner.cfg
    try:
        learner.cfg = dataclasses.replace(original, micro_batch_size=3)  # groups of 4 are cut: pre-pass
        learner.load_init(learner.init)
        learner.step(rollouts)
    finally:
        learner.cfg = original
    tolerance = 1e-5 if learner.dtype == "float32" else 1e-2
    assert max_diff(learner.weights(), reference) <= tolerance


def test_a_fixed_sft_anchor_never_moves_and_stays_sft_from_another_init(tiny_model_dir, rollouts):
    """warp.anchor = sft (classic RLHF): no EMA update; a later iteration's θ_init keeps θ_sft as the anchor."""
    from learners.learner import LearnerRank

    cfg = LearnersConfig(lr=1e-3, warmup_steps=0, micro_batch_size=8)
    rank = LearnerRank(tiny_model_dir, cfg, beta=0.1, mu=0.5, dtype="float32", seed=0, anchor="sft")
    try:
        sft = rank.weights()

        def anchor_is_sft() -> bool:
            anchor = rank.anchor.state_dict()
            return all(torch.equal(anchor[name], tensor) for name, tensor in sft.tensors())

        assert rank.step(rollouts)["kl"] == 0.0 and rank.step(rollouts)["kl"] != 0.0
        assert anchor_is_sft() and rank.anchor.updates == 0
        moved = rank.weights()  # stands in for the next iteration's θ_init
        assert not flat_equal(moved, sft)
        rank.load_init(moved, anchor=sft)
        assert flat_equal(rank.weights(), moved) and anchor_is_sft()
        assert rank.step(rollouts)["kl"] != 0.0  # θ_init ≠ θ_sft: the first step already pays KL
        assert anchor_is_sft()
    finally:
        rank.shutdown()


RESTART_AFTER_FOREIGN_TEARDOWN = """
import sys, torch.distributed as dist
from learners.learner import LearnerRank
from tests.learners.conftest import make_rollouts
from warp_rlhf.config import LearnersConfig

cfg = LearnersConfig(lr=1e-3, warmup_steps=0, micro_batch_size=8)
first = LearnerRank(sys.argv[1], cfg, beta=0.1, mu=0.5, dtype="float32", seed=0)
first.step(make_rollouts())
first.shutdown()
dist.destroy_process_group()  # what an in-process vLLM engine's shutdown does, behind DeepSpeed's back
second = LearnerRank(sys.argv[1], cfg, beta=0.1, mu=0.5, dtype="float32", seed=0)
print("LOSS", second.step(make_rollouts())["loss"])
"""


def test_a_learner_starts_after_another_library_destroyed_the_process_group(tiny_model_dir):
    """In one process, a learner after an in-process vLLM engine's shutdown (which destroys torch's default group
    but not DeepSpeed's clones of it) starts and steps. A fresh process: the suite's own group must stay intact."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-c", RESTART_AFTER_FOREIGN_TEARDOWN, str(tiny_model_dir)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "LOSS" in out.stdout, out.stderr[-3000:]


DEEPSPEED_COMM_WITHOUT_SHM_OP = """
import os, sys
import deepspeed
from deepspeed import comm
from learners.distributed import SHM_OP, init_process_group

init_process_group(0, 1, "127.0.0.1", 0, "gloo")
print("OP", comm.comm.cdb.shm_comm_op)  # None: neither built nor loaded
print("COMPATIBLE", deepspeed.ops.__compatible_ops__[SHM_OP])  # restored once the backend is up
print("BUILT", sorted(os.listdir(sys.argv[1])))
"""


def test_deepspeed_starts_its_communication_without_building_or_loading_the_shm_op(tmp_path):
    """DeepSpeed's CPU backend compiled its shm all-reduce op (tensor-parallel inference only) at every first
    init: a minute of compiling at install and a stale-lock hang after a kill mid-build. A fresh process with an
    empty extensions directory: after init the op is not loaded and nothing was built there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_COMM_WITHOUT_SHM_OP, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OP None" in out.stdout and "COMPATIBLE True" in out.stdout and "BUILT []" in out.stdout, out.stdout
