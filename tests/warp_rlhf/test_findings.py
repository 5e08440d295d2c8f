"""The findings' decisions on study tables whose truth is known: a verdict follows the numbers, either way."""

from __future__ import annotations

import math

import pytest

from warp_rlhf.config import config_from_dict
from warp_rlhf.findings import Claim, decide_all, front_gap
from warp_rlhf.study import train_samples

SE = 0.002  # every row's Monte-Carlo standard error: small, so the synthetic gaps decide


def row(arm: str, seed: int, model: str, kind: str, reward: float, kl: float, **extra) -> dict:
    settings = {"ema": ("ema", 2, 2), "sft": ("sft", 1, 1)}[extra.pop("anchor", "ema")]
    return {"arm": arm, "seed": seed, "model": model, "kind": kind, "reward": reward, "kl": kl, "reward_se": SE,
            "kl_se": SE, "anchor": settings[0], "runs": settings[1], "iterations": settings[2], "beta": 0.1,
            "iteration": extra.get("iteration", 0), "eta": extra.get("eta", math.nan), "run": extra.get("run", 0),
            "step": extra.get("step", -1), "train_samples": extra.get("train_samples", 0)}  # fmt: skip


def study(seeds=(0, 1, 2), warp_wins: bool = True) -> list[dict]:
    """WARP (EMA, M = 2, I = 2) and RLOO (θ_sft anchor), on a reward-KL plane where RLOO's front is r = 0.1·KL.

    With ``warp_wins`` every WARP model lies 0.05 above that front, SLERP beats its runs and LERP, LERP has
    the lower KL, and the gains shrink; otherwise every one of those is reversed.
    """
    s = 1 if warp_wins else -1
    rows = []
    for seed in seeds:
        jitter = 0.001 * seed
        for arm, anchor in (("warp", "ema"), ("rloo", "sft")):
            rows.append(row(arm, seed, "sft", "sft", 0.0, 0.0, anchor=anchor))
        for t in (1, 2, 3, 4):  # RLOO's trajectory, the front; and WARP's iteration-1 runs above (or below) it
            rows.append(row("rloo", seed, f"iter-1/run-1@{t}", "policy", 0.1 * t + jitter, t, anchor="sft",
                            iteration=1, run=1, step=t, train_samples=8 * t))  # fmt: skip
        for m in (1, 2):
            for t in (1, 2):
                rows.append(row("warp", seed, f"iter-1/run-{m}@{t}", "policy", 0.1 * t + s * 0.05 + jitter, t,
                                iteration=1, run=m, step=t, train_samples=16 * t))  # fmt: skip
        first, second = (0.30, 0.34) if warp_wins else (0.05, 0.18)  # θ_slerp per iteration: gains 0.30, 0.04
        for i, (reward, kl) in enumerate(((first, 2.0), (second, 2.5)), start=1):
            rows.append(row("warp", seed, f"iter-{i}/slerp", "slerp", reward + jitter, kl, iteration=i,
                            train_samples=32 * i))  # fmt: skip
            rows.append(row("warp", seed, f"iter-{i}/lerp", "lerp", reward - s * 0.03, kl - s * 0.5, iteration=i))
        for eta in (0.25, 0.5, 0.75, 1.0):  # LITI: KL falls (∝ η′²) faster than the reward (∝ η′)
            rows.append(row("warp", seed, f"liti η'={eta:g}", "liti", (0.1 * 2.5 * eta**2 if s < 0 else 0.3 * eta)
                            + jitter, 2.5 * eta**2 if s > 0 else 2.5 * eta, iteration=2, eta=eta,
                            train_samples=64))  # fmt: skip
        rows.append(row("rloo", seed, "iter-1/run-1@8", "policy", 0.35 + jitter - s * 0.1, 8.0, anchor="sft",
                        iteration=1, run=1, step=8, train_samples=64))  # fmt: skip
    return rows


def test_every_finding_is_reproduced_on_a_study_where_warp_wins() -> None:
    verdicts = {f.key: f.verdict for f in decide_all(study())}
    assert verdicts == dict.fromkeys(("anchor", "merge", "liti", "iterations", "rloo"), "reproduced")


def test_the_same_machinery_says_not_reproduced_when_the_numbers_say_so() -> None:
    verdicts = {f.key: f.verdict for f in decide_all(study(warp_wins=False))}
    assert verdicts == dict.fromkeys(("anchor", "merge", "liti", "iterations", "rloo"), "not reproduced")


def test_one_seed_decides_on_the_rows_own_standard_errors() -> None:
    merge = next(f for f in decide_all(study(seeds=(0,))) if f.key == "merge")
    verdict, gap, se = merge.claims[0].decide()
    assert verdict == "reproduced" and gap == pytest.approx(0.30 - 0.25)  # θ_slerp − the runs' policies @2
    assert se == pytest.approx(math.sqrt(2) * SE)


def test_a_claim_is_inconclusive_within_two_standard_errors_and_follows_the_papers_sign() -> None:
    noisy = Claim("noisy")
    for seed, gap in enumerate((0.01, -0.005, 0.012)):
        noisy.add(seed, gap, 0.0)
    assert noisy.decide()[0] == "inconclusive at this scale"
    lower = Claim("lower is the paper's direction", sign=-1)
    for seed, gap in enumerate((-0.2, -0.21)):
        lower.add(seed, gap, 0.01)
    assert lower.decide()[0] == "reproduced"
    twice = Claim("one seed measured twice (two iterations) is one seed, its gaps averaged")
    twice.add(0, 0.1, 0.03)
    twice.add(0, 0.3, 0.04)
    assert twice.decide()[1:] == (pytest.approx(0.2), pytest.approx(0.025)) and len(twice.measured) == 1
    assert Claim("nothing").decide()[0] == "not measured"


def test_a_front_is_compared_only_where_the_kl_ranges_overlap() -> None:
    front = [{"kl": k, "reward": 0.1 * k, "reward_se": 0.0} for k in (0.0, 1.0, 2.0)]
    gap, se = front_gap(
        [{"kl": 1.5, "reward": 0.2, "reward_se": 0.0}, {"kl": 9.0, "reward": 5.0, "reward_se": 0}], front
    )
    assert gap == pytest.approx(0.05) and se == 0.0
    assert math.isnan(front_gap([{"kl": 3.0, "reward": 1.0, "reward_se": 0.0}], front)[0])


def test_a_study_without_the_arms_a_finding_needs_says_not_measured() -> None:
    only_rloo = [r for r in study() if r["arm"] == "rloo"]
    verdicts = {f.key: f.verdict for f in decide_all(only_rloo)}
    assert verdicts == dict.fromkeys(("anchor", "merge", "liti", "iterations", "rloo"), "not measured")


def test_train_samples_count_every_runs_completions_up_to_the_model() -> None:
    cfg = config_from_dict({"warp": {"iterations": 2, "runs": 2, "steps": [3, 5], "prompts_per_step": 4},
                            "actors": {"samples_per_prompt": 2}})  # fmt: skip
    batch = 4 * 2
    assert train_samples(cfg, {"kind": "sft", "iteration": 0, "step": -1}) == 0
    assert train_samples(cfg, {"kind": "policy", "iteration": 2, "step": 1}) == 2 * (3 + 1) * batch
    for kind in ("slerp", "init", "lerp", "liti"):
        assert train_samples(cfg, {"kind": kind, "iteration": 2, "step": -1}) == 2 * (3 + 5) * batch
