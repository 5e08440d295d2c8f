"""The pure maths: log-probs, shaped reward, baselines, loss gradient, EMA, batch layout. No DeepSpeed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learners.anchor import EmaAnchor, ema_update_
from learners.batching import pack_micro_batches, split_groups
from learners.objective import (
    advantages,
    kl_shaped_reward,
    reinforce_loss,
    sequence_logprobs,
    sequence_logprobs_and_entropy,
)
from warp_rlhf.config import ConfigError, LearnersConfig


class Rows(torch.nn.Module):
    """An output head: one-hot hidden states (..., V) → rows of W (..., V)."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.table


class Bigram(torch.nn.Module):
    """logits[b, t] = W[input_ids[b, t]]: a policy whose REINFORCE gradient can be written by hand, its logits
    made by an output head as a causal LM's are."""

    def __init__(self, vocab: int = 6, seed: int = 0) -> None:
        super().__init__()
        self.head = Rows(vocab, seed)

    @property
    def table(self) -> torch.nn.Parameter:
        return self.head.table

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=False, past_key_values=None, position_ids=None):
        one_hot = torch.nn.functional.one_hot(input_ids, self.table.shape[0]).to(self.table.dtype)  # (B, L, V)
        # A bigram needs no context, so its cache is empty; it lets the shared-prompt forward run on it.
        cache = SimpleNamespace(batch_select_indices=lambda _rows: None) if use_cache else None
        return SimpleNamespace(logits=self.head(one_hot), past_key_values=cache)


def toy_batch():
    # Two prompts × two samples; row 3 is right-padded. Prompt tokens (mask false) are never scored.
    input_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 5], [0, 3, 1, 2], [0, 3, 2, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    completion = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    return input_ids, attention, completion


def test_sequence_logprobs_sum_teacher_forced_completion_tokens():
    model = Bigram()
    ids, attention, completion = toy_batch()
    logp = sequence_logprobs(model, ids, attention, completion)
    table = torch.log_softmax(model.table.detach(), -1)
    expected = [sum(float(table[ids[b, t - 1], ids[b, t]]) for t in range(1, 4) if completion[b, t]) for b in range(4)]
    torch.testing.assert_close(logp.detach(), torch.tensor(expected))


@pytest.mark.parametrize("share", [False, True], ids=["plain", "shared-prompts"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])  # the learner's attention: bf16 and fp32 on CPU
def test_only_completion_positions_reach_the_output_head_of_a_real_model(tiny_model_dir, kernel, share):
    """The head maps the N scored positions alone (shared prompts: each prompt's last position, then the
    completions' own), and log-probs, entropy and gradients equal those computed from the model's full
    (B, L, V) logits over every row's whole prompt + completion."""
    from transformers import AutoModelForCausalLM

    from learners.objective import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=kernel)
    ids, attention, completion = toy_batch()
    ids = ids + 40  # ordinary tokens of the tiny tokenizer
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    logp, entropy, _ = sequence_logprobs_and_entropy(
        model, ids, attention, completion, temperature=0.7, share_prompts=share
    )
    handle.remove()
    scored = completion[:, 1:]
    hidden = model.config.hidden_size
    if share:  # two distinct prompts; the 4 first tokens are scored by the prompts' forward
        assert seen == [torch.Size([2, hidden]), torch.Size([int(scored.sum()) - 4, hidden])]
    else:
        assert seen == [torch.Size([int(scored.sum()), hidden])]
    (grad,) = torch.autograd.grad(logp.sum(), model.model.embed_tokens.weight)

    full = model(input_ids=ids, attention_mask=attention).logits  # (B, L, V)
    token_logp, token_entropy = token_logprobs(full[:, :-1][scored], ids[:, 1:][scored], 0.7)
    rows = torch.nonzero(scored, as_tuple=True)[0]
    expected = torch.zeros(4).index_add(0, rows, token_logp)
    torch.testing.assert_close(logp, expected)
    torch.testing.assert_close(entropy, torch.zeros(4).index_add(0, rows, token_entropy) / scored.sum(-1))
    (expected_grad,) = torch.autograd.grad(expected.sum(), model.model.embed_tokens.weight)
    torch.testing.assert_close(grad, expected_grad)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone after the forward


def test_entropy_is_mean_token_entropy_of_the_completion():
    model = Bigram()
    ids, attention, completion = toy_batch()
    _, entropy, _ = sequence_logprobs_and_entropy(model, ids, attention, completion)
    p = torch.softmax(model.table.detach(), -1)
    h = -(p * p.log()).sum(-1)  # entropy of each row of the table
    expected = [np.mean([float(h[ids[b, t - 1]]) for t in range(1, 4) if completion[b, t]]) for b in range(4)]
    torch.testing.assert_close(entropy, torch.tensor(expected, dtype=torch.float32))


def test_loss_gradient_equals_hand_computed_reinforce_gradient():
    model = Bigram()
    ids, attention, completion = toy_batch()
    reward = torch.tensor([1.0, -0.5, 2.0, 0.25])
    group = torch.tensor([7, 7, 9, 9])
    logp = sequence_logprobs(model, ids, attention, completion)
    adv = advantages(kl_shaped_reward(reward, logp, logp, beta=0.1), group, "rloo")
    reinforce_loss(logp, adv).backward()

    # ∂ log softmax(W[a])[b] / ∂ W[a] = onehot(b) − softmax(W[a]); loss = −(1/N) Σ_i A_i log π(y_i).
    p = torch.softmax(model.table.detach(), -1)
    expected = torch.zeros_like(p)
    for b in range(4):
        for t in range(1, 4):
            if completion[b, t]:
                prev, tok = ids[b, t - 1], ids[b, t]
                expected[prev] -= float(adv[b]) / 4 * (torch.nn.functional.one_hot(tok, 6) - p[prev])
    torch.testing.assert_close(model.table.grad, expected)
    torch.testing.assert_close(adv, torch.tensor([1.5, -1.5, 1.75, -1.75]))


def test_kl_term_is_zero_when_policy_equals_anchor():
    model = Bigram()
    logp = sequence_logprobs(model, *toy_batch())
    anchor = EmaAnchor(Bigram(), mu=0.01)
    anchor_logp = anchor.sequence_logprobs(*toy_batch())
    reward = torch.tensor([0.3, 0.1, -0.2, 0.0])
    torch.testing.assert_close(kl_shaped_reward(reward, logp, anchor_logp, beta=0.5), reward)
    shifted = kl_shaped_reward(reward, logp + 1.0, anchor_logp, beta=0.5)  # log π − log π_ema = 1
    torch.testing.assert_close(shifted, reward - 0.5)
    assert not shifted.requires_grad


def test_baselines():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    g = torch.tensor([0, 0, 0, 5, 5])
    torch.testing.assert_close(advantages(r, g, "rloo"), torch.tensor([-1.5, 0.0, 1.5, -10.0, 10.0]))
    torch.testing.assert_close(advantages(r, g, "mean"), r - 7.2)
    torch.testing.assert_close(advantages(r, g, "none"), r)
    with pytest.raises(ValueError, match="baseline"):
        advantages(r, g, "median")


def test_rloo_with_one_sample_per_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rloo needs at least 2 samples per prompt; group_id\(s\) \[3\]"):
        advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 3]), "rloo")


def test_reinforce_loss_is_normalised_by_sequences():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 0.0])
    assert float(reinforce_loss(logp, adv)) == pytest.approx(-(-1 - 2 + 3) / 4)
    halves = reinforce_loss(logp[:2], adv[:2], 4) + reinforce_loss(logp[2:], adv[2:], 4)
    assert float(halves) == pytest.approx(float(reinforce_loss(logp, adv)))


def test_ema_matches_closed_form_after_t_steps():
    mu, steps = 0.3, 5
    module = torch.nn.Linear(3, 2)
    theta0 = {k: v.detach().clone() for k, v in module.named_parameters()}
    anchor = EmaAnchor(module, mu=mu)
    thetas = [{k: torch.randn_like(v) for k, v in theta0.items()} for _ in range(steps)]
    for theta in thetas:
        anchor.update(theta.items())
    for name, start in theta0.items():
        closed = (1 - mu) ** steps * start + sum(
            mu * (1 - mu) ** (steps - s) * thetas[s - 1][name] for s in range(1, 6)
        )
        torch.testing.assert_close(anchor.ema[name], closed)
        torch.testing.assert_close(dict(anchor.module.named_parameters())[name].detach(), closed)
    assert anchor.updates == steps
    anchor.reset(theta0.items())
    torch.testing.assert_close(anchor.ema["weight"], theta0["weight"])


def test_bf16_anchor_accumulates_in_fp32():
    module = torch.nn.Linear(4, 4).to(torch.bfloat16)
    anchor = EmaAnchor(module, mu=0.01)
    target = {k: v.detach().float() + 1e-4 for k, v in anchor.module.named_parameters()}
    for _ in range(10):
        anchor.update(target.items())
    drift = anchor.ema["weight"] - (target["weight"] - 1e-4)  # a bf16 EMA would not move at all
    torch.testing.assert_close(drift, torch.full_like(drift, 1e-4 * (1 - 0.99**10)), rtol=0, atol=1e-7)
    ema = torch.zeros(2)
    ema_update_(ema, torch.ones(2, dtype=torch.bfloat16), 0.25)
    torch.testing.assert_close(ema, torch.full((2,), 0.25))


@pytest.mark.parametrize(("dtype", "bytes_per_param"), [(torch.float32, 4), (torch.bfloat16, 2 + 4)])
def test_anchor_bytes_count_each_storage_once(dtype: torch.dtype, bytes_per_param: int):
    anchor = EmaAnchor(torch.nn.Linear(8, 4).to(dtype), mu=0.01)  # fp32: the accumulator is the weight itself
    assert anchor.local_bytes() == (8 * 4 + 4) * bytes_per_param


def test_split_groups_keeps_prompts_whole_and_balances_rows():
    gids = np.repeat([5, 1, 9, 3, 7], [4, 4, 2, 4, 2])
    parts = split_groups(gids, 2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(gids)))
    assert not set(gids[parts[0]]) & set(gids[parts[1]])
    assert abs(len(parts[0]) - len(parts[1])) <= 4
    assert [len(p) for p in split_groups(np.repeat([0, 1, 2], 2), 3)] == [2, 2, 2]
    with pytest.raises(ValueError, match="2 prompt groups cannot be split over 3"):
        split_groups(np.array([0, 0, 1]), 3)


def test_pack_micro_batches():
    gids = np.repeat([0, 1, 2], 4)
    batches, intact = pack_micro_batches(gids, 8)
    assert intact and [len(b) for b in batches] == [8, 4]
    batches, intact = pack_micro_batches(gids, 3)
    assert not intact and max(len(b) for b in batches) <= 3
    assert sorted(np.concatenate(batches).tolist()) == list(range(12))


@pytest.mark.parametrize(
    ("key", "value", "message"), [("zero_stage", 4, "learners.zero_stage = 4"), ("lr", -1e-6, "learners.lr")]
)
def test_bad_config_is_a_clear_error(key, value, message):
    with pytest.raises(ConfigError, match=message):
        LearnersConfig(**{key: value})


def test_shared_prompts_give_the_plain_forward_per_token_results_in_row_order(tiny_model_dir):
    """Rows of one prompt need not be adjacent, groups differ in size, prompts in length, one completion is empty:
    the shared-prompt forward gives the plain forward's sums, entropies, per-token log-probs (row-major, at
    another temperature) and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    prompts = {0: [41, 42, 43], 1: [50], 2: [60, 61]}
    rows = [(0, [70, 71, 72]), (1, [73]), (0, [74]), (2, [75, 76]), (1, [77, 78, 79, 80]), (0, []), (1, [81, 82])]
    width = max(len(prompts[g]) + len(c) for g, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    for b, (g, c) in enumerate(rows):
        p = prompts[g]
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attention[b, : len(p) + len(c)] = 1
        completion[b, len(p) : len(p) + len(c)] = True

    results = {}
    for share in (False, True):
        logp, entropy, tokens = sequence_logprobs_and_entropy(
            model, ids, attention, completion, temperature=0.7, token_temperature=1.0, share_prompts=share
        )
        (grad,) = torch.autograd.grad(logp.sum(), model.model.layers[0].self_attn.q_proj.weight)
        results[share] = (logp.detach(), entropy, tokens, grad)
    for plain, shared in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert results[True][2].shape == (int(completion.sum()),)
    assert float(results[True][0][5]) == 0.0  # the empty completion


@pytest.mark.parametrize("zero3", [False, True])
def test_shared_prompts_take_two_forwards_where_a_prompt_repeats_and_always_under_zero3(zero3):
    """Rows that repeat no prompt (or a one-row dummy) take the plain single forward; but ZeRO-3 gathers the
    parameters in every forward, collectively, so a ZeRO-3 rank runs two whatever its rows, or ranks hang."""
    model = Bigram()
    if zero3:
        model.table.ds_status = "partitioned"  # what DeepSpeed's ZeRO-3 marks its parameters with
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ids, attention, completion = toy_batch()
    for rows, forwards in ((slice(0, 4), 2), (slice(1, 3), 2 if zero3 else 1), (slice(0, 1), 2 if zero3 else 1)):
        calls.clear()
        sequence_logprobs(model, ids[rows], attention[rows], completion[rows])
        assert len(calls) == forwards
    calls.clear()
    sequence_logprobs(model, ids, attention, completion, share_prompts=False)
    assert len(calls) == 1
