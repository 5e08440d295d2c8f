"""`warp-rlhf eval`: the KL–reward plane of a finished (or partial) run, on held-out prompts.

Evaluated models: θ_sft, every iter-<i>/slerp and iter-<i>/init (and iter-<i>/lerp where `warp-rlhf
study` merged one), the runs' policy snapshots (output.policy_every) with their final policies, and the
LITI family (1 − η′) θ_sft + η′ θ_slerp^I for η′ in eval.etas; η′ > 1 extrapolates past θ_slerp (ExPO,
Zheng et al. 2024). For each: samples y ~ π on the held-out prompts, mean reward, and
KL(π ‖ π_sft) = E_y [log π(y|x) − log π_sft(y|x)] by Monte Carlo.

The policy measured is the one the run trained: samples are drawn with the run's sampling settings
(actors.temperature T, actors.top_k; eval.temperature and eval.top_k override them), and pareto.parquet
records the settings used. Both log-probabilities are of softmax(logits / T) over the whole vocabulary,
as the learner's objective scores them: top-k only decides which samples are drawn (a token outside
θ_sft's top-k would otherwise have log π_sft = −∞). With top-k off the estimate is of exactly
KL(π_T ‖ π_sft,T). Both sequence log-probabilities come from the same vLLM engine by prefill scoring,
so the estimator is exactly 0 for θ_sft and free of sampler/learner numeric drift.

Prompt g's samples come from their own random stream, seeded from (seed, g) and the same for every
model: streams are independent across prompts and reproducible, and models are compared on common
random numbers. η′ = 0 is θ_sft and η′ = 1 is θ_slerp^I bit for bit, so those two are not sampled
again: their rows repeat θ_sft's and θ_slerp^I's under their own labels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from warp_rlhf.config import ActorsConfig, Config, load_config
from warp_rlhf.data import load_prompts
from warp_rlhf.outputs import RunDir, is_complete_checkpoint, write_parquet_atomic

if TYPE_CHECKING:
    from warp_rlhf.placement import GroupSpec

log = logging.getLogger("warp_rlhf")


class EvalError(ValueError):
    """The run directory cannot be evaluated."""


@dataclass(frozen=True)
class Sampler:
    """The sampling settings of an evaluation, recorded in every row of pareto.parquet."""

    temperature: float
    top_k: int  # -1: off
    samples_per_prompt: int
    max_new_tokens: int
    seed: int


def eval_sampler(cfg: Config) -> Sampler:
    """The run's trained sampling settings, unless eval.temperature / eval.top_k (0: from the run) override them."""
    temperature = cfg.eval.temperature or cfg.actors.temperature
    top_k = cfg.eval.top_k or cfg.actors.top_k
    return Sampler(temperature, top_k, cfg.eval.samples_per_prompt, cfg.actors.max_new_tokens, cfg.seed)


@dataclass(frozen=True)
class Candidate:
    label: str  # "sft", "iter-2/slerp", "liti eta'=0.5", "iter-1/run-2@8", ...
    kind: str  # sft | slerp | init | lerp | liti | policy (a run's policy after `step` steps: early stopping)
    iteration: int
    eta: float  # η′ for the LITI family, NaN otherwise
    source: Any  # HF directory, or a callable returning FlatWeights
    same_as: str | None = None  # the label of a candidate with bit-identical weights: its samples are reused
    run: int = 0  # kind policy: its run and step; 0 and -1 otherwise
    step: int = -1


def candidates(out: RunDir, cfg: Config) -> list[Candidate]:
    sft = Path(cfg.model.path)
    found = [Candidate("sft", "sft", 0, float("nan"), sft)]
    last = 0
    for i in range(1, cfg.warp.iterations + 1):
        if not (is_complete_checkpoint(out.slerp(i)) and is_complete_checkpoint(out.init(i))):
            break
        found += [Candidate(f"iter-{i}/slerp", "slerp", i, float("nan"), out.slerp(i))]
        found += [Candidate(f"iter-{i}/init", "init", i, float("nan"), out.init(i))]
        if is_complete_checkpoint(out.lerp(i)):  # merged offline by `warp-rlhf study`
            found += [Candidate(f"iter-{i}/lerp", "lerp", i, float("nan"), out.lerp(i))]
        found += _trajectories(out, cfg, i)
        last = i
    if last == 0:
        raise EvalError(f"{str(out.root)!r} has no completed iteration (no iter-1/slerp and iter-1/init)")
    # liti_family is exact at the ends: η′ = 0 is θ_sft and η′ = 1 is θ_slerp^I, bit for bit.
    ends = {0.0: "sft", 1.0: f"iter-{last}/slerp"}
    for eta in cfg.eval.etas:
        found.append(Candidate(f"liti η'={eta:g}", "liti", last, eta, (sft, out.slerp(last), eta), ends.get(eta)))
    return found


def _trajectories(out: RunDir, cfg: Config, i: int) -> list[Candidate]:
    """The runs' snapshots (output.policy_every) and, with them, each run's final policy: early stopping."""
    snapshots = out.snapshots(i)
    finals = [(m, cfg.warp.steps_in(i), out.policy(i, m)) for m in sorted({m for m, _, _ in snapshots})]
    return [Candidate(f"iter-{i}/run-{m}@{t}", "policy", i, float("nan"), path, run=m, step=t)
            for m, t, path in sorted(snapshots + finals)]  # fmt: skip


def load_candidate(candidate: Candidate, version: int, states: dict[Path, dict]):  # noqa: ANN201 - FlatWeights
    """The candidate's weights; ``states`` keeps θ_sft and θ_slerp^I so the LITI family reads each once."""
    from merger import load_flat
    from merger.flat import flatten

    if isinstance(candidate.source, tuple):
        sft, slerp, eta = candidate.source
        for path in (sft, slerp):
            if path not in states:
                states[path] = load_flat(path).state_dict()
        return flatten(liti_family(states[sft], states[slerp], eta).items(), version)
    return load_flat(candidate.source, version)


def liti_family(sft: dict, slerp: dict, eta: float) -> dict:
    """(1 − η′) θ_sft + η′ θ_slerp for any η′ ≥ 0, in θ_sft's dtype; exact at η′ = 0 and η′ = 1.

    merger.liti is the training update and keeps its η in [0, 1]; the evaluated family may go past
    θ_slerp, so it calls the same per-tensor kernel without that bound.
    """
    from merger.weights import add_task_vectors, check_same_layout

    check_same_layout(sft, [slerp])
    return {name: add_task_vectors(t, [slerp[name]], [eta]) for name, t in sft.items()}


def eval_shape(cfg: Config) -> tuple[ActorsConfig, Config]:
    """The evaluation's engines and the one-run config that places them.

    The training's engine slots are free during evaluation: one pool of full-model engines (no LoRA slots,
    every candidate is a merged checkpoint) uses them all, K per run, or K when the runs shared their engines.
    """
    runs = 1 if cfg.actors.share_engines else cfg.warp.runs
    engines = replace(cfg.actors, engines_per_run=cfg.actors.engines_per_run * runs, share_engines=False)
    return engines, replace(cfg, actors=engines, warp=replace(cfg.warp, runs=1))


def eval_specs(cfg: Config) -> list[GroupSpec]:
    """The placement groups an evaluation of a run of ``cfg`` asks for: its engines and the reward model's."""
    from warp_rlhf.placement import group_specs

    return [spec for spec in group_specs(eval_shape(cfg)[1], []) if spec.role in ("engine", "reward")]


def evaluate(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """Evaluate every model of the run; writes pareto.parquet and pareto.png; returns the table."""
    import ray
    from tqdm import tqdm

    from actors import ActorPool, make_reward, score_rollouts
    from warp_rlhf.cluster import RunPlacement, connect, shutdown

    out = RunDir(Path(run_dir))
    if not out.config.is_file():
        raise EvalError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = load_config(out.config, overrides)
    models = candidates(out, cfg)
    sampler = eval_sampler(cfg)
    prompts = load_prompts(cfg.data.eval, cfg.data.prompt_column, "eval")
    prompts = prompts[: cfg.eval.max_prompts or None]
    reward = None if cfg.reward.remote else make_reward(cfg.reward)  # a bad reward fails before Ray starts
    engines, specs = eval_shape(cfg)[0], eval_specs(cfg)
    started = connect(cfg, specs)
    placement = pool = None
    try:
        placement = RunPlacement(specs, cfg.resources.placement_timeout_s)
        reward = reward or make_reward(cfg.reward, placement_group=placement.get("reward"))
        log.info("eval: %d models, %d prompts x %d samples each; starting %d engines", len(models), len(prompts),
                 sampler.samples_per_prompt, engines.engines_per_run)  # fmt: skip
        pool = ActorPool(cfg.model.path, engines, dtype=cfg.model.dtype, seed=cfg.seed,
                         placement_groups=placement.engines(1))  # fmt: skip
        rows, samples, states = [], {}, {}
        generated = [m for m in models if m.same_as is None]
        progress = tqdm(total=len(generated), desc="eval", unit="model", dynamic_ncols=True)  # with its ETA
        began = time.perf_counter()
        for version, candidate in enumerate(generated, start=1):
            weights = ray.put(load_candidate(candidate, version, states))
            pool.sync(weights, version)
            table = pool.generate(prompts, n=sampler.samples_per_prompt, temperature=sampler.temperature,
                                  top_k=sampler.top_k, seed=sampler.seed)  # fmt: skip
            table = score_rollouts(table, reward, cfg.reward.length_penalty)
            samples[candidate.label] = (table, pool.score(table, sampler.temperature))
            rate = sum(t.num_rows for t, _ in samples.values()) / (time.perf_counter() - began)
            progress.set_postfix(model=candidate.label, samples_per_s=f"{rate:.1f}")
            progress.update(1)
        progress.close()
        # Scored under θ_sft for the KL; θ_sft's own samples already were (log-ratio 0, bit for bit).
        log.info("eval: scoring %d models' samples under θ_sft for the KL", len(samples) - 1)
        pool.sync(ray.put(load_candidate(models[0], 0, states)), 0)
        log_ratios = {models[0].label: np.zeros(len(samples[models[0].label][1]))}
        for label, (table, logp) in samples.items():
            if label not in log_ratios:
                log_ratios[label] = logp - pool.score(table, sampler.temperature)
        for candidate in models:  # the same samples, seed and weights give the same rows under another label
            label = candidate.same_as or candidate.label
            rows.append(_row(candidate, samples[label][0], log_ratios[label], sampler))
    finally:
        if pool is not None:
            pool.shutdown()
        if placement is not None:
            placement.remove()
        if started:
            shutdown()
    result = pa.Table.from_pylist(rows)
    write_parquet_atomic(out.root / "pareto.parquet", result)
    plot_pareto(result, out.root / "pareto.png")
    return result


def _row(candidate: Candidate, table: pa.Table, log_ratio: np.ndarray, sampler: Sampler) -> dict[str, Any]:
    rewards = table.column("reward").to_numpy()
    n = len(rewards)
    return {
        "model": candidate.label,
        "kind": candidate.kind,
        "iteration": candidate.iteration,
        "eta": candidate.eta,
        "run": candidate.run,
        "step": candidate.step,
        "reward": float(rewards.mean()),
        "reward_se": float(rewards.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "kl": float(log_ratio.mean()),
        "kl_se": float(log_ratio.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "samples": n,
        "temperature": sampler.temperature,  # of the sampler and of both log-probabilities in the KL
        "top_k": sampler.top_k,  # of the sampler only; -1: off
        "samples_per_prompt": sampler.samples_per_prompt,
        "max_new_tokens": sampler.max_new_tokens,
        "seed": sampler.seed,
    }


def plot_pareto(table: pa.Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    family = sorted((r for r in rows if r["kind"] == "liti"), key=lambda r: r["eta"])
    ax.plot([r["kl"] for r in family], [r["reward"] for r in family], "o-", color="tab:gray", label="LITI η′ family")
    for i, m in sorted({(r["iteration"], r["run"]) for r in rows if r["kind"] == "policy"}):
        trajectory = sorted((r for r in rows if r["kind"] == "policy" and (r["iteration"], r["run"]) == (i, m)),
                            key=lambda r: r["step"])  # fmt: skip
        ax.plot([r["kl"] for r in trajectory], [r["reward"] for r in trajectory], ".:", alpha=0.7,
                label=f"iteration {i} run {m} every {trajectory[0]['step']} steps (early stopping)")  # fmt: skip
    styles = {"sft": ("k", "s"), "slerp": ("tab:red", "*"), "init": ("tab:blue", "o"), "lerp": ("tab:green", "D")}
    for kind, (color, marker) in styles.items():
        chosen = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["kl"] for r in chosen], [r["reward"] for r in chosen], c=color, marker=marker, s=80,
                   label={"sft": "θ_sft", "slerp": "θ_slerp (per iteration)", "init": "θ_init (LITI)",
                          "lerp": "θ_lerp (offline, per iteration)"}[kind],
                   zorder=3)  # fmt: skip
        for r in chosen:
            ax.annotate(r["model"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    save_kl_reward_plot(fig, ax, "WARP: KL–reward front", path)


def save_kl_reward_plot(fig: Any, ax: Any, title: str, path: Path, fontsize: int = 8) -> None:
    """Label the KL–reward plane, add the legend, and write the figure to ``path`` atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("KL(π ‖ π_sft)  (nats per completion)")
    ax.set_ylabel("mean reward (held-out prompts)")
    ax.set_title(title, fontsize=fontsize + 2)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def summary(table: pa.Table) -> str:
    """The table `make demo` prints: reward and KL for θ_sft, each θ_slerp and θ_init, the LITI family."""
    lines = []
    if table.num_rows and "temperature" in table.column_names:  # tables written before it was recorded lack it
        r = table.slice(0, 1).to_pylist()[0]
        top_k, t = "off" if r["top_k"] == -1 else r["top_k"], r["temperature"]
        lines.append(f"sampled at temperature {t:g}, top-k {top_k}, {r['samples_per_prompt']} samples per prompt; "
                     f"KL at temperature {t:g} over the full vocabulary")  # fmt: skip
    lines.append(f"{'model':<18} {'reward':>8} {'± se':>7} {'KL':>8} {'± se':>7}")
    for r in table.to_pylist():
        lines.append(f"{r['model']:<18} {r['reward']:>8.4f} {r['reward_se']:>7.4f} {r['kl']:>8.3f} {r['kl_se']:>7.3f}")
    return "\n".join(lines)
