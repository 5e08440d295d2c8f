"""LoRA learners in-process on the tiny model: the adapter is all that trains, the policy leaves the learner as
full HF weights W_init + s·B·A, the anchor is θ_init + s·B̄·Ā (the EMA of the factors), resume is exact, and
the merger's SLERP + LITI of two LoRA runs equals the float64 reference built from the dense task vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.learners.conftest import make_rollouts
from warp_rlhf.config import Config, LearnersConfig, LoraConfig, MergerConfig, WarpConfig

TARGETS = ("q_proj", "v_proj")
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


def lora_learner(model_dir, dtype: str, seed: int = 0, stage: int = 0, anchor: str = "ema"):
    from learners.learner import LearnerRank

    cfg = LearnersConfig(zero_stage=stage, lr=2e-2, warmup_steps=0, micro_batch_size=8, grad_clip=0.0,
                         lora=LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS))  # fmt: skip
    return LearnerRank(model_dir, cfg, beta=0.1, mu=0.5, dtype=dtype, seed=seed, anchor=anchor)


@pytest.fixture(scope="module")
def init(tiny_model_dir):
    from merger import load_flat

    return load_flat(tiny_model_dir)


@pytest.fixture(scope="module", params=[(0, "float32"), (2, "bfloat16")], ids=["zero0-fp32", "zero2-bf16"])
def learner(request, tiny_model_dir, init):
    stage, dtype = request.param
    rank = lora_learner(tiny_model_dir, dtype, stage=stage)
    rank.init = init
    yield rank
    rank.shutdown()


def factors(learner, master: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's factors as the module holds them (model dtype), or the optimizer's fp32 masters."""
    from learners.distributed import master_parameters
    from learners.lora import adapter_parameters

    module = learner.engine.module
    pairs = master_parameters(module, learner.engine.optimizer, True) if master else adapter_parameters(module)
    return {name: p.data.float().clone() for name, p in pairs}


def dense_deltas(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF weight name → s·B·A in float64, from peft factor names."""
    out = {}
    for name, a in named.items():
        if ".lora_A." in name:
            b = named[name.replace(".lora_A.", ".lora_B.")]
            hf = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight")
            out[hf] = SCALE * (b.double() @ a.double())
    return out


def test_only_the_adapter_trains_and_the_policy_is_w_init_plus_s_b_a(learner, init, rollouts):
    learner.load_init(init)
    trainable = [n for n, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    start = learner.weights(master=True)
    assert sorted(start.names()) == sorted(init.names())  # HF names: engines, merger and save_hf see a plain model
    dtype = getattr(torch, learner.dtype)
    base = {n: t.float() for n, t in init.tensors()}  # θ_init itself (fp32), not the bf16 module's rounding
    assert all(torch.equal(t, base[n]) for n, t in start.tensors())  # B = 0: exactly θ_init, in fp32
    for seed in range(3):
        assert not learner.step(make_rollouts(seed=seed))["skipped"]
    policy = dict(learner.weights(master=True).tensors())
    deltas = dense_deltas(factors(learner, master=True))
    assert len(deltas) == 2 * 2  # two layers × (q_proj, v_proj)
    for name, weight in policy.items():
        assert weight.dtype == torch.float32
        if name in deltas:
            expected = base[name].double() + deltas[name]
            assert float(deltas[name].abs().max()) > 1e-4  # the step moved it
            assert float((weight.double() - expected).abs().max()) < 1e-6
        else:
            assert torch.equal(weight, base[name])  # frozen: bit for bit
    engine_copy = dict(learner.weights().tensors())  # what the engines load: the model dtype
    assert {t.dtype for t in engine_copy.values()} == {dtype}


def test_the_anchor_is_w_init_plus_the_ema_of_the_factors(learner, init):
    """Ā ← (1 − μ)Ā + μA after each step (μ = 0.5): the anchor scores with θ_init + s·B̄·Ā, not with
    θ_init + EMA(s·B·A), and the two differ (so this test tells them apart)."""
    from learners.lora import merged_parameters
    from learners.objective import sequence_logprobs

    learner.load_init(init)
    ema = factors(learner)
    ema_of_products = {name: torch.zeros_like(d) for name, d in dense_deltas(ema).items()}
    for seed in range(3):
        learner.step(make_rollouts(seed=seed))
        now = factors(learner, master=True)  # the EMA follows the fp32 factors, not their bf16 rounding
        for name in ema:
            ema[name].lerp_(now[name], 0.5)
        for name, d in dense_deltas(now).items():
            ema_of_products[name].lerp_(d, 0.5)
    for name, value in ema.items():
        assert torch.equal(learner.anchor.ema[name], value), name
    anchor_deltas = dense_deltas(ema)
    gap = max(float((anchor_deltas[n] - ema_of_products[n]).norm() / ema_of_products[n].norm()) for n in anchor_deltas)
    assert 1e-4 < gap < 0.5, gap  # second order: close to, but not, the EMA of the products

    # The anchor's log-probs are those of a plain model holding θ_init + s·B̄·Ā.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(learner.engine.module.base_model.model.config._name_or_path,
                                                 dtype=getattr(torch, learner.dtype))  # fmt: skip
    dtype = getattr(torch, learner.dtype)
    merged = dict(merged_parameters(learner.engine.module, {n: t.to(dtype) for n, t in ema.items()}))
    plain.load_state_dict(merged, strict=False)
    batch = make_rollouts(seed=5)
    from actors.rollout import to_tensors

    tensors = to_tensors(batch, 0)
    inputs = (tensors["input_ids"], tensors["attention_mask"], tensors["completion_mask"])
    with torch.no_grad():
        expected = sequence_logprobs(plain.eval(), *inputs)
    got = learner.anchor.sequence_logprobs(*inputs)
    tolerance = 1e-4 if learner.dtype == "float32" else 2e-2 * float(expected.abs().max())
    assert float((got - expected).abs().max()) < tolerance
    # Scoring swapped the anchor's factors in and back out: the policy is untouched.
    assert all(torch.equal(v, factors(learner)[n]) for n, v in factors(learner).items())


def test_save_state_then_load_state_continues_like_an_uninterrupted_run(learner, init, tmp_path):
    learner.load_init(init)
    learner.step(make_rollouts(seed=0))
    learner.save_state(tmp_path / "state")
    for seed in (1, 2):
        learner.step(make_rollouts(seed=seed))
    uninterrupted, anchor = learner.weights(master=True), learner.anchor.state_dict()
    learner.load_init(init)
    learner.load_state(tmp_path / "state")
    for seed in (1, 2):
        learner.step(make_rollouts(seed=seed))
    resumed = learner.weights(master=True)
    assert max(float((a - b).abs().max()) for (_, a), (_, b) in zip(resumed.tensors(), uninterrupted.tensors(),
                                                                     strict=True)) <= 1e-6  # fmt: skip
    assert all(torch.equal(learner.anchor.state_dict()[n], t) for n, t in anchor.items())


def test_load_init_restarts_the_adapter_at_zero_on_a_new_base(learner, init):
    """Next iteration: a new θ_init becomes the frozen base, B = 0 again, the anchor is θ_init."""
    from merger.flat import flatten

    learner.load_init(init)
    learner.step(make_rollouts(seed=0))
    new_init = flatten(((n, t.clone() + 0.01) for n, t in init.tensors()), version=7)
    learner.load_init(new_init)
    after = learner.weights(master=True)
    assert after.version == 7
    assert all(torch.equal(t, dict(new_init.tensors())[n].float()) for n, t in after.tensors())  # θ_init exactly
    assert learner.step(make_rollouts(seed=0))["kl"] == 0.0  # policy = anchor at the first step


def test_a_fixed_sft_anchor_is_the_base_without_the_adapter(tiny_model_dir, init):
    from actors.rollout import to_tensors
    from learners.objective import sequence_logprobs

    rank = lora_learner(tiny_model_dir, "float32", anchor="sft")
    try:
        rank.load_init(init)
        for seed in range(2):
            rank.step(make_rollouts(seed=seed))
        tensors = to_tensors(make_rollouts(seed=5), 0)
        inputs = (tensors["input_ids"], tensors["attention_mask"], tensors["completion_mask"])
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = sequence_logprobs(plain, *inputs)
        assert float((rank.anchor.sequence_logprobs(*inputs) - expected).abs().max()) < 1e-5
    finally:
        rank.shutdown()


def test_merging_two_lora_runs_equals_the_float64_reference_from_dense_task_vectors(tiny_model_dir, init, tmp_path):
    """SLERP (per tensor) then LITI of two LoRA runs, by the merger service's code, against float64 maths on
    δ_m = s·B_m·A_m: zero task vectors (untouched tensors) merge to θ_init; targets follow the angle."""
    from merger.service import Merger

    runs, deltas = [], []
    for seed in (1, 2):
        rank = lora_learner(tiny_model_dir, "float32", seed=seed)
        try:
            rank.load_init(init)
            for step in range(3):
                rank.step(make_rollouts(seed=10 * seed + step))
            runs.append(rank.weights(master=True))
            deltas.append(dense_deltas(factors(rank)))
        finally:
            rank.shutdown()
    lam, eta = 0.5, 0.3
    config = Config(warp=WarpConfig(lam=lam, eta=eta), merger=MergerConfig(method="slerp", granularity="tensor"))
    new_init = Merger(config, tiny_model_dir, tmp_path).merge(1, init, runs)
    from merger import load_flat

    slerp = dict(load_flat(tmp_path / "iter-1" / "slerp").tensors())
    for name, base in init.tensors():
        base = base.double()
        d1, d2 = (d.get(name, torch.zeros_like(base)) for d in deltas)
        if name in deltas[0]:
            omega = math.acos(float((d1 * d2).sum() / (d1.norm() * d2.norm())))
            c1, c2 = (math.sin((1 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega))
            merged = base + c1 * d1 + c2 * d2
        else:
            merged = base
        reference_init = base + eta * (merged - base)
        atol = 4 * float(np.finfo(np.float32).eps) * float(base.abs().max() + 1)
        assert float((slerp[name].double() - merged).abs().max()) < atol, name
        assert float((dict(new_init.tensors())[name].double() - reference_init).abs().max()) < atol, name


def test_only_linear_layers_can_be_adapted() -> None:
    """A GPT-2 style Conv1D stores its weight transposed: B·A would land transposed, so it is refused."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from learners.lora import wrap

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is not a torch.nn.Linear layer \(Conv1D\)"):
        wrap(model, LoraConfig(rank=2, target_modules=("c_attn",)))
