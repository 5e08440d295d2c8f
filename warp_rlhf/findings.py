"""The paper's four findings, and WARP against classic RLOO, decided from study.parquet alone.

Each finding is a few claims. A claim is a gap in the paper's direction, measured once per seed on
common random numbers (every model of a seed is sampled from the same streams). Its standard error is
the larger of the between-seed one (two seeds or more) and the Monte-Carlo one propagated from the
rows' own standard errors; the claim is *reproduced* when gap/se > 2, *not reproduced* when
gap/se < −2, and *inconclusive at this scale* otherwise. A finding is reproduced when all its claims
are, not reproduced when any is not, inconclusive otherwise. "At equal KL" compares a model's reward
with another family's front at the same KL: piecewise linear in KL through that family's points,
only where the KL ranges overlap. Which arms play which part follows from their settings:

1. anchor: runs anchored on their EMA against runs anchored on θ_sft, per β (iteration 1's policies);
2. merge: θ_slerp against each of its runs' final policies and their LERP (arms with M ≥ 2);
3. liti: the LITI family (1 − η′) θ_sft + η′ θ_slerp against the same arm's early-stopping front;
4. iterations: θ_slerp's reward from one iteration to the next (arms with I ≥ 2);
5. rloo: WARP (EMA anchor, M ≥ 2) against classic RLOO (θ_sft anchor, M = I = 1) at equal samples.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]

VERDICTS = ("reproduced", "not reproduced", "inconclusive at this scale", "not measured")


@dataclass
class Claim:
    text: str  # what is measured, in the paper's direction: "SLERP's reward − the best run's"
    sign: int = 1  # +1: the paper expects the gap above 0; −1: below
    decisive: bool = True  # False: reported beside the finding, not part of its verdict
    measured: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # seed → (gap, Monte-Carlo se)

    def add(self, seed: int, gap: float, se: float) -> None:
        """One measurement of a seed; a seed measured several times (iterations, arms) counts once, averaged."""
        if math.isfinite(gap):
            self.measured.setdefault(seed, []).append((gap, se if math.isfinite(se) else 0.0))

    def decide(self) -> tuple[str, float, float]:
        """(verdict, mean gap, its se)."""
        n = len(self.measured)
        if n == 0:
            return "not measured", float("nan"), float("nan")
        gaps = [float(np.mean([g for g, _ in m])) for m in self.measured.values()]
        ses = [math.sqrt(sum(s * s for _, s in m)) / len(m) for m in self.measured.values()]
        mean = float(np.mean(gaps))
        monte_carlo = math.sqrt(sum(s * s for s in ses)) / n
        between = float(np.std(gaps, ddof=1)) / math.sqrt(n) if n >= 2 else 0.0
        se = max(monte_carlo, between)
        if not se > 0:  # no Monte-Carlo se and one seed: nothing says how far the gap is from noise
            return VERDICTS[2], mean, float("nan")
        z = self.sign * mean / se
        verdict = VERDICTS[0] if z > 2 else VERDICTS[1] if z < -2 else VERDICTS[2]
        return verdict, mean, se

    def line(self) -> str:
        verdict, mean, se = self.decide()
        if verdict == "not measured":
            return f"- {self.text}: not measured"
        if not self.decisive:
            return (
                f"- {self.text}: **{mean:+.4f} ± {se:.4f}** over {len(self.measured)} seed(s) (reported, not decisive)"
            )
        expected = "> 0" if self.sign > 0 else "< 0"
        return (f"- {self.text} (paper: {expected}): **{mean:+.4f} ± {se:.4f}** over {len(self.measured)} seed(s): "
                f"{verdict}")  # fmt: skip


@dataclass
class Finding:
    key: str
    title: str
    paper: str
    claims: list[Claim]
    table: list[Row]  # seed means of the models the finding compares
    draw: Callable[[Any], None] | None = None  # draws the finding's plot on a matplotlib Axes
    note: str = ""

    @property
    def verdict(self) -> str:
        verdicts = [c.decide()[0] for c in self.claims if c.decisive]
        measured = [v for v in verdicts if v != "not measured"]
        if not measured:
            return "not measured"
        if "not reproduced" in measured:
            return "not reproduced"
        return "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive at this scale"


# ---------------------------------------------------------------------------------------------------
# Selecting rows.


def pick(rows: list[Row], **match: Any) -> list[Row]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def by_seed(rows: list[Row]) -> dict[int, list[Row]]:
    seeds: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        seeds[r["seed"]].append(r)
    return dict(sorted(seeds.items()))


def finals(rows: list[Row], iteration: int) -> list[Row]:
    """Each run's last evaluated policy of an iteration (its final one: eval adds it beside the snapshots)."""
    last = {}
    for r in pick(rows, kind="policy", iteration=iteration):
        if r["run"] not in last or r["step"] > last[r["run"]]["step"]:
            last[r["run"]] = r
    return [last[m] for m in sorted(last)]


def arms(rows: list[Row], test: Callable[[Row], bool]) -> list[str]:
    """The arms whose settings (any of their rows) pass ``test``, sorted by name."""
    return sorted({r["arm"] for r in rows if test(r)})


def front_gap(points: list[Row], front: list[Row]) -> tuple[float, float]:
    """Mean reward of ``points`` above ``front`` at the same KL (overlap only), and its Monte-Carlo se."""
    front = sorted(front, key=lambda r: r["kl"])
    if len(front) < 2:
        return float("nan"), float("nan")
    kls, rewards, ses = (np.array([r[k] for r in front]) for k in ("kl", "reward", "reward_se"))
    inside = [p for p in points if kls[0] <= p["kl"] <= kls[-1]]
    if not inside:
        return float("nan"), float("nan")
    gaps = [p["reward"] - np.interp(p["kl"], kls, rewards) for p in inside]
    var = [p["reward_se"] ** 2 + np.interp(p["kl"], kls, ses) ** 2 for p in inside]
    return float(np.mean(gaps)), float(math.sqrt(np.mean(var)))  # points share noise: no 1/√n


def seed_means(rows: list[Row], key: Callable[[Row], Any]) -> list[Row]:
    """One row per ``key`` group: reward and KL averaged over seeds (and runs), se between seeds when ≥ 2."""
    groups: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    out = []
    for group in groups.values():
        seeds = by_seed(group)
        mean = {name: [float(np.mean([r[name] for r in rs])) for rs in seeds.values()] for name in ("reward", "kl")}
        n, first = len(seeds), group[0]
        row = {k: first[k] for k in ("arm", "model", "kind", "iteration", "eta", "run", "step", "train_samples")}
        for name, values in mean.items():
            row[name] = float(np.mean(values))
            row[f"{name}_se"] = (float(np.std(values, ddof=1) / math.sqrt(n)) if n >= 2
                                 else float(np.mean([r[f"{name}_se"] for r in group])))  # fmt: skip
        row["seeds"] = n
        if len({r["run"] for r in group}) > 1:  # a step of every run: iter-1/run-1@3 and iter-1/run-2@3
            row["model"] = re.sub(r"run-\d+@", "runs@", row["model"])
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# The findings.


def anchor(rows: list[Row]) -> Finding:
    claims, shown, lines = [], [], []
    for beta in sorted({r["beta"] for r in rows}):
        ema = arms(rows, lambda r, b=beta: r["anchor"] == "ema" and r["beta"] == b)
        sft = arms(rows, lambda r, b=beta: r["anchor"] == "sft" and r["beta"] == b)
        if not (ema and sft):
            continue
        claim = Claim(
            f"β = {beta:g}: reward of `{ema[0]}`'s EMA-anchored runs − the front of `{sft[0]}`'s "
            "θ_sft-anchored runs at equal KL"
        )
        for seed, seed_rows in by_seed(rows).items():
            points = pick(seed_rows, arm=ema[0], kind="policy", iteration=1)
            front = pick(seed_rows, arm=sft[0], kind="sft") + pick(seed_rows, arm=sft[0], kind="policy", iteration=1)
            claim.add(seed, *front_gap(points, front))
        claims.append(claim)
        for arm, style in ((ema[0], "-"), (sft[0], "--")):
            chosen = pick(rows, arm=arm, kind="sft") + pick(rows, arm=arm, kind="policy", iteration=1)
            means = sorted(seed_means(chosen, lambda r: r["step"] if r["kind"] == "policy" else 0), key=_step)
            shown += means
            lines.append((f"{arm} (β = {beta:g}, {'EMA' if style == '-' else 'θ_sft'} anchor)", style, means))
    if not claims:
        claims = [Claim("an EMA-anchored and a θ_sft-anchored arm at one β")]
    return Finding("anchor", "1. The EMA anchor against the fixed θ_sft anchor",
                   "the EMA anchor beats the fixed SFT anchor at every β (higher reward at equal KL)",
                   claims, shown, lambda ax: _lines(ax, lines))  # fmt: skip


def merge(rows: list[Row]) -> Finding:
    best = Claim("reward of θ_slerp − the best of its runs' final policies")
    lerp = Claim("reward of θ_slerp − θ_lerp of the same policies")
    kl = Claim("KL of θ_lerp − KL of θ_slerp", sign=-1)
    shown, points = [], []
    for arm in arms(rows, lambda r: r["runs"] >= 2):
        for i in sorted({r["iteration"] for r in pick(rows, arm=arm, kind="lerp")}):
            for seed, seed_rows in by_seed(pick(rows, arm=arm)).items():
                slerp, merged = pick(seed_rows, kind="slerp", iteration=i), pick(seed_rows, kind="lerp", iteration=i)
                runs = finals(seed_rows, i)
                if runs:
                    top = max(runs, key=lambda r: r["reward"])
                    best.add(seed, slerp[0]["reward"] - top["reward"], _se(slerp[0], top, "reward"))
                lerp.add(seed, slerp[0]["reward"] - merged[0]["reward"], _se(slerp[0], merged[0], "reward"))
                kl.add(seed, merged[0]["kl"] - slerp[0]["kl"], _se(slerp[0], merged[0], "kl"))
            chosen = [r for r in pick(rows, arm=arm, iteration=i) if r["kind"] in ("slerp", "lerp")]
            chosen += [r for seed_rows in by_seed(pick(rows, arm=arm)).values() for r in finals(seed_rows, i)]
            means = seed_means(chosen, lambda r: (r["kind"], r["run"]))
            shown += means
            points += [(f"{arm} iteration {i}", means)]
    return Finding("merge", "2. SLERP against its single runs and LERP",
                   "SLERP of M runs beats each single run and LERP in reward; LERP mostly lowers KL",
                   [best, lerp, kl], shown, lambda ax: _points(ax, points))  # fmt: skip


def liti(rows: list[Row]) -> Finding:
    front_claim = Claim("reward of the LITI family (0 < η′ < 1) − the early-stopping front at equal KL")
    faster = Claim("share of θ_slerp's reward gain kept − share of its KL kept, mean over 0 < η′ < 1")
    shown, lines = [], []
    for arm in arms(rows, lambda r: r["kind"] == "liti" and 0 < r["eta"] < 1):
        if not pick(rows, arm=arm, kind="policy", iteration=1):
            continue
        for seed, seed_rows in by_seed(pick(rows, arm=arm)).items():
            family = [r for r in pick(seed_rows, kind="liti") if 0 < r["eta"] < 1]
            sft, end = pick(seed_rows, kind="sft")[0], _eta(seed_rows, 1.0)
            front_claim.add(seed, *front_gap(family, [sft, *pick(seed_rows, kind="policy", iteration=1)]))
            if family and end is not None and end["reward"] > sft["reward"] and end["kl"] > 0:
                shares = [(r["reward"] - sft["reward"]) / (end["reward"] - sft["reward"]) - r["kl"] / end["kl"]
                          for r in family]  # fmt: skip
                faster.add(seed, float(np.mean(shares)), 0.0)
        family = sorted(seed_means(pick(rows, arm=arm, kind="liti"), lambda r: r["eta"]), key=lambda r: r["eta"])
        stopping = pick(rows, arm=arm, kind="sft") + pick(rows, arm=arm, kind="policy", iteration=1)
        stopping = sorted(seed_means(stopping, lambda r: r["step"] if r["kind"] == "policy" else 0), key=_step)
        shown += family + stopping
        lines += [(f"{arm}: LITI family η′", "-", family), (f"{arm}: early stopping (iteration 1)", ":", stopping)]
    return Finding("liti", "3. LITI against early stopping",
                   "as η falls, KL falls faster than reward: a better front than early stopping",
                   [front_claim, faster], shown, lambda ax: _lines(ax, lines),
                   note="The second claim's se is between seeds only (a ratio of noisy gains).")  # fmt: skip


def iterations(rows: list[Row]) -> Finding:
    later = Claim("reward gain of θ_slerp per iteration after the first (mean of r_i − r_{i−1}, i ≥ 2)")
    smaller = Claim("last iteration's reward gain − the first iteration's", sign=-1)
    shown, lines = [], []
    for arm in arms(rows, lambda r: r["iterations"] >= 2):
        for seed, seed_rows in by_seed(pick(rows, arm=arm)).items():
            path = pick(seed_rows, kind="sft") + sorted(pick(seed_rows, kind="slerp"), key=lambda r: r["iteration"])
            if len(path) < 3:
                continue
            gains = [b["reward"] - a["reward"] for a, b in zip(path, path[1:], strict=False)]
            last = len(path) - 1  # mean of gains 2..I = (r_I − r_1) / (I − 1); last − first = r_I − r_{I−1} − r_1 + r_0
            later.add(seed, float(np.mean(gains[1:])), _combined_se(path, [(last, 1), (1, -1)]) / (last - 1))
            smaller.add(seed, gains[-1] - gains[0], _combined_se(path, [(last, 1), (last - 1, -1), (1, -1), (0, 1)]))
        means = seed_means([r for r in pick(rows, arm=arm) if r["kind"] in ("sft", "slerp")], lambda r: r["model"])
        means.sort(key=lambda r: r["iteration"])
        shown += means
        lines.append((f"{arm}: θ_slerp per iteration", "-", means))
    return Finding("iterations", "4. Iterations", "iterations push the front outward, with diminishing returns",
                   [later, smaller], shown, lambda ax: _lines(ax, lines, [line[0] for line in lines]))  # fmt: skip


def rloo(rows: list[Row]) -> Finding:
    front_claim = Claim("reward of WARP's models (θ_slerp, θ_init, LITI family) − RLOO's front at equal KL")
    # The paper compares KL–reward fronts; at equal samples the two policies sit at different KLs, so their
    # reward and KL differences are reported beside the verdict, not in it.
    equal = Claim("reward of WARP's last θ_slerp − RLOO's policy after as many generated samples", decisive=False)
    equal_kl = Claim("KL of WARP's last θ_slerp − KL of RLOO's policy after as many generated samples", decisive=False)
    shown, lines = [], []
    warp = arms(rows, lambda r: r["anchor"] == "ema" and r["runs"] >= 2)
    classic = arms(rows, lambda r: r["anchor"] == "sft" and r["runs"] == 1 and r["iterations"] == 1)
    note = ""
    if warp and classic:  # the first WARP arm, against a classic arm at its β if there is one
        a = warp[0]
        b = next((c for c in classic if pick(rows, arm=c)[0]["beta"] == pick(rows, arm=a)[0]["beta"]), classic[0])
        for seed in by_seed(rows):
            mine, theirs = pick(rows, arm=a, seed=seed), pick(rows, arm=b, seed=seed)
            models = [r for r in mine if r["kind"] in ("slerp", "init", "liti") and not r["eta"] > 1]
            front_claim.add(seed, *front_gap(models, pick(theirs, kind="sft") + pick(theirs, kind="policy")))
            last = max(pick(mine, kind="slerp"), key=lambda r: r["iteration"])
            same = [r for r in pick(theirs, kind="policy") if r["train_samples"] == last["train_samples"]]
            if same:
                equal.add(seed, last["reward"] - same[0]["reward"], _se(last, same[0], "reward"))
                equal_kl.add(seed, last["kl"] - same[0]["kl"], _se(last, same[0], "kl"))
            else:
                note = (f"No policy of `{b}` has exactly {last['train_samples']} generated samples, WARP's total: "
                        "give RLOO that many steps (and output.policy_every dividing them).")  # fmt: skip
        family = sorted(seed_means(pick(rows, arm=a, kind="liti"), lambda r: r["eta"]), key=lambda r: r["eta"])
        merged = seed_means([r for r in pick(rows, arm=a) if r["kind"] in ("slerp", "init")], lambda r: r["model"])
        trajectory = pick(rows, arm=b, kind="sft") + pick(rows, arm=b, kind="policy")
        trajectory = sorted(seed_means(trajectory, lambda r: r["step"] if r["kind"] == "policy" else 0), key=_step)
        shown += sorted(merged, key=lambda r: r["model"]) + family + trajectory
        lines += [(f"{a}: LITI family", "-", family), (f"{b}: classic RLOO, every snapshot", "--", trajectory),
                  (f"{a}: θ_slerp, θ_init", "", sorted(merged, key=lambda r: r["model"]))]  # fmt: skip
    named = [line[0] for line in lines[-1:]]  # θ_slerp and θ_init of each iteration
    return Finding("rloo", "5. WARP against classic RLOO at the same number of generated samples",
                   "(the question users ask first) WARP's KL–reward front lies above classic RLHF's",
                   [front_claim, equal, equal_kl], shown, lambda ax: _lines(ax, lines, named), note)  # fmt: skip


FINDINGS = (anchor, merge, liti, iterations, rloo)


def _se(a: Row, b: Row, name: str) -> float:
    return math.sqrt(a[f"{name}_se"] ** 2 + b[f"{name}_se"] ** 2)


def _combined_se(path: list[Row], terms: list[tuple[int, int]]) -> float:
    """Monte-Carlo se of Σ w · reward(path[k]) over (k, w) terms, the rows independent (a repeated k adds up)."""
    total: dict[int, int] = defaultdict(int)
    for k, w in terms:
        total[k] += w
    return math.sqrt(sum((w * path[k]["reward_se"]) ** 2 for k, w in total.items()))


def _eta(rows: list[Row], eta: float) -> Row | None:
    return next((r for r in pick(rows, kind="liti") if r["eta"] == eta), None)


def _step(row: Row) -> int:
    return row["step"] if row["kind"] == "policy" else 0


# ---------------------------------------------------------------------------------------------------
# Plots and the report.


def _lines(ax: Any, lines: list[tuple[str, str, list[Row]]], annotate: Collection[str] = ()) -> None:
    """One errorbar line per (label, style, rows); the points of the lines labelled in ``annotate`` are named."""
    for label, style, rows in lines:
        ax.errorbar([r["kl"] for r in rows], [r["reward"] for r in rows], xerr=[r["kl_se"] for r in rows],
                    yerr=[r["reward_se"] for r in rows], fmt=f"o{style}", ms=4, capsize=2, label=label)  # fmt: skip
        for r in rows if label in annotate else ():
            ax.annotate(r["model"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _points(ax: Any, groups: list[tuple[str, list[Row]]]) -> None:
    markers = {"slerp": "*", "lerp": "D", "policy": "o"}
    for label, rows in groups:
        for kind, marker in markers.items():
            chosen = [r for r in rows if r["kind"] == kind]
            name = {"policy": "runs' final policies"}.get(kind, f"θ_{kind}")
            ax.errorbar([r["kl"] for r in chosen], [r["reward"] for r in chosen], xerr=[r["kl_se"] for r in chosen],
                        yerr=[r["reward_se"] for r in chosen], fmt=marker, ms=8, capsize=2,
                        label=f"{label}: {name}")  # fmt: skip


def plot(finding: Finding, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from warp_rlhf.evaluate import save_kl_reward_plot

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if finding.draw is not None:
        finding.draw(ax)
    save_kl_reward_plot(fig, ax, finding.title, path, fontsize=7)


def table_markdown(rows: list[Row]) -> str:
    lines = ["| arm | model | reward | KL | samples generated | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['model']} | {r['reward']:.4f} ± {r['reward_se']:.4f} | "
                     f"{r['kl']:.3f} ± {r['kl_se']:.3f} | {r['train_samples']} | {r['seeds']} |")  # fmt: skip
    return "\n".join(lines)


def decide_all(rows: list[Row]) -> list[Finding]:
    return [find(rows) for find in FINDINGS]
