"""`warp-rlhf study`: arms × seeds of ordinary runs, evaluated alike, gathered into one table and a report.

A spec is a small YAML file::

    config: ../configs/demo.yaml        # the base config, relative to the spec
    dir: runs/studies/paper             # the study's directory, relative to the working directory
    seeds: [0, 1, 2]
    overrides: [eval.max_prompts=64]    # every arm, before its own
    arms:                               # name: overrides, exactly as `train` takes them
      warp: [output.policy_every=4]
      rloo: [warp.anchor=sft, warp.runs=1, warp.iterations=1, warp.steps=64, output.policy_every=8]

Each (arm, seed) is an ordinary run directory, ``<dir>/<arm>/seed-<s>/``, trained by the same code as
`train`: a finished run is never retrained and an interrupted one resumes where it stopped. A run of
M ≥ 2 policies also gets, per iteration, the LERP of the same policies (``iter-<i>/lerp/``, merged
offline, no retraining). Every run is then evaluated by `eval` on the same held-out prompts with the
same sampler (checked before anything starts), and the rows are gathered into ``study.parquet``: one
row per evaluated model, with its arm, seed and the generated samples its training cost. The findings
(:mod:`warp_rlhf.findings`) are computed from that table alone into ``findings/*.png`` and ``report.md``.

Every configuration error of every arm, and a run directory that cannot be resumed with its arm's
configuration, is reported before the first run starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from warp_rlhf.config import Config, ConfigError, load_config
from warp_rlhf.outputs import RunDir, is_complete_checkpoint, write_atomic, write_parquet_atomic

log = logging.getLogger("warp_rlhf")

SPEC_KEYS = ("config", "dir", "seeds", "overrides", "arms")
# What the arms must share for their rows to be compared: the same held-out prompts, sampler and reward.
SHARED = ("model.path", "data.eval", "data.prompt_column", "eval.max_prompts", "eval.samples_per_prompt",
          "eval.temperature", "eval.top_k", "actors.max_new_tokens", "reward.kind", "reward.path",
          "reward.length_penalty")  # fmt: skip


class StudyError(ConfigError):
    """The study's spec, or one of its arms, is wrong; the message names the key or the arm."""


@dataclass(frozen=True)
class Spec:
    path: Path
    base: Path | None  # the base config; None: the defaults
    dir: Path
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    arms: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Member:
    """One (arm, seed) of the study: its configuration and run directory."""

    arm: str
    seed: int
    cfg: Config

    @property
    def out(self) -> RunDir:
        return RunDir(Path(self.cfg.output.dir))

    @property
    def key(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


def load_spec(path: str | Path, dir: str | None = None, seeds: list[int] | None = None) -> Spec:
    """Read and check a spec; ``dir`` and ``seeds`` replace the spec's own (the command line's --dir, --seeds)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study spec {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"study spec {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"study spec {str(path)!r}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    if unknown := sorted(set(raw) - set(SPEC_KEYS)):
        raise StudyError(f"unknown key {unknown[0]!r} in study spec {str(path)!r}; valid keys: {', '.join(SPEC_KEYS)}")
    base = None
    if raw.get("config"):
        base = (path.parent / str(raw["config"])).resolve()
        if not base.is_file():
            raise StudyError(f"config = {raw['config']!r}: {str(base)!r} does not exist (relative to the spec)")
    seeds = seeds if seeds is not None else raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):  # fmt: skip
        raise StudyError(f"seeds = {seeds!r}: must be a non-empty list of distinct integers")
    arms = raw.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise StudyError("arms: must map each arm's name to its list of overrides (key.sub=value)")
    for name, overrides in arms.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
            raise StudyError(f"arm name {name!r}: use letters, digits, '.', '_' and '-' (it names a directory)")
        _check_overrides(f"arms.{name}", overrides)
    _check_overrides("overrides", raw.get("overrides") or [])
    where = dir or raw.get("dir")
    if not where:
        raise StudyError("dir: the study's directory is required (in the spec, or --dir)")
    return Spec(path, base, Path(str(where)), tuple(seeds), tuple(raw.get("overrides") or ()),
                {str(name): tuple(o or ()) for name, o in arms.items()})  # fmt: skip


def _check_overrides(key: str, overrides: Any) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise StudyError(f"{key} = {overrides!r}: must be a list of overrides such as warp.beta=0.1")
    if bad := [o for o in overrides if o.split("=", 1)[0] in ("seed", "output.dir")]:
        raise StudyError(f"{key}: {bad[0]!r}: the study sets seed and output.dir itself (seeds, dir)")


def members(spec: Spec, extra: tuple[str, ...] = ()) -> list[Member]:
    """Every (arm, seed), seed by seed so that a partial study has every arm of its first seeds; all checked."""
    _check_overrides("the command line's overrides", list(extra))
    found = []
    for seed in spec.seeds:
        for arm, overrides in spec.arms.items():
            out = spec.dir / arm / f"seed-{seed}"
            try:
                cfg = load_config(spec.base, [*spec.overrides, *overrides, *extra, f"seed={seed}", f"output.dir={out}"])
            except ConfigError as exc:
                raise StudyError(f"arm {arm!r}: {exc}") from None
            found.append(Member(arm, seed, cfg))
    _check_comparable(found)
    return found


def _check_comparable(found: list[Member]) -> None:
    from warp_rlhf.resume import flatten

    first = found[0]
    reference = flatten(first.cfg.to_dict())
    for member in found[1:]:
        values = flatten(member.cfg.to_dict())
        for key in SHARED:
            if values[key] != reference[key]:
                raise StudyError(
                    f"arms {first.arm!r} and {member.arm!r} differ in {key} ({reference[key]!r} vs {values[key]!r}): "
                    "the arms of a study are evaluated on the same prompts with the same sampler and reward"
                )
    if len({m.cfg.actors.temperature for m in found}) > 1 and not first.cfg.eval.temperature:
        raise StudyError("arms differ in actors.temperature: set eval.temperature for every arm, so that their "
                         "models are sampled and their KL measured at one temperature")  # fmt: skip
    if len({m.cfg.actors.top_k for m in found}) > 1 and not first.cfg.eval.top_k:
        raise StudyError("arms differ in actors.top_k: set eval.top_k for every arm (one evaluation sampler)")


def check_inputs(found: list[Member]) -> list[Member]:
    """Model, prompts and resumability of every member, before any run: returns them with θ_sft resolved."""
    from warp_rlhf.data import load_prompts
    from warp_rlhf.hardware import resolve_dtype
    from warp_rlhf.models import check_model_matches, resolve_model
    from warp_rlhf.resume import ResumeError, check_holds_no_foreign_files, config_differences, recorded_dtype, resolved

    checked, models, prompts = [], {}, set()
    for member in found:
        cfg, _ = resolve_dtype(member.cfg, recorded_dtype(member.out))
        for split, source in (("train", cfg.data.train), ("eval", cfg.data.eval)):
            if (split, source) not in prompts:
                load_prompts(source, cfg.data.prompt_column, split)
                prompts.add((split, source))
        model = (cfg.model.path, cfg.model.dtype)
        if model not in models:
            models[model] = resolve_model(*model)
        check_model_matches(models[model], cfg.model.dtype, cfg.learners.lora.targets)  # headers only: cheap
        cfg = resolved(cfg, models[model])
        if member.out.config.is_file():
            saved = yaml.safe_load(member.out.config.read_text()) or {}
            if differences := config_differences(saved, cfg.to_dict()):
                raise ResumeError(f"arm {member.arm!r}, seed {member.seed}: {str(member.out.root)!r} holds a run "
                                  f"with another config: {'; '.join(differences)}")  # fmt: skip
        check_holds_no_foreign_files(member.out)
        checked.append(replace(member, cfg=cfg))
    return checked


def run_study(spec: Spec, extra: tuple[str, ...] = (), command: str = "") -> Path:
    """Train, merge and evaluate every member that is not done yet; then gather and report. Returns the directory."""
    from warp_rlhf.cluster import shared_local_ray
    from warp_rlhf.evaluate import eval_specs, evaluate
    from warp_rlhf.loop import train

    began = time.perf_counter()
    found = check_inputs(members(spec, extra))
    spec.dir.mkdir(parents=True, exist_ok=True)
    write_atomic(spec.dir / "spec.yaml", yaml.safe_dump(_spec_record(spec, extra), sort_keys=False))
    times = Times(spec.dir / "times.json")
    # The Ray work still to do, on one local instance rather than one per train and eval.
    ray_work = [(m.cfg, None) for m in found if m.out.completed_iterations() < m.cfg.warp.iterations]
    ray_work += [(m.cfg, eval_specs(m.cfg)) for m in found if not evaluated(m.out, m.cfg)]
    with times.phase(WHOLE, "wall_s"), shared_local_ray(ray_work):
        for n, member in enumerate(found, start=1):
            cfg, out = member.cfg, member.out
            log.info("study: %s (%d of %d)", member.key, n, len(found))
            if out.completed_iterations() < cfg.warp.iterations:
                with times.phase(member.key, "train_s"):
                    train(cfg, resume=True)
            if cfg.warp.runs >= 2 and (missing := missing_lerps(out)):  # timed only when there is work
                with times.phase(member.key, "merge_s"):
                    lerp_merges(out, cfg, missing)
            if not evaluated(out, cfg):
                with times.phase(member.key, "eval_s"):
                    evaluate(out.root)
    table = gather(found)
    write_parquet_atomic(spec.dir / "study.parquet", table)
    write_report(table.to_pylist(), spec, found, times.load(), time.perf_counter() - began, command)
    return spec.dir


def _spec_record(spec: Spec, extra: tuple[str, ...]) -> dict[str, Any]:
    return {"config": str(spec.base) if spec.base else None, "dir": str(spec.dir), "seeds": list(spec.seeds),
            "overrides": [*spec.overrides, *extra], "arms": {a: list(o) for a, o in spec.arms.items()}}  # fmt: skip


def missing_lerps(out: RunDir) -> list[int]:
    """The completed iterations whose offline LERP is not there yet."""
    return [i for i in range(1, out.completed_iterations() + 1) if not is_complete_checkpoint(out.lerp(i))]


def lerp_merges(out: RunDir, cfg: Config, iterations: list[int]) -> None:
    """Each iteration's LERP of the same M policies SLERP merged (the uniform task-vector average)."""
    from merger.streaming import merge_checkpoints

    for i in iterations:
        init = out.init(i - 1) if i > 1 else Path(cfg.model.path)
        policies = [out.policy(i, m) for m in range(1, cfg.warp.runs + 1)]
        merge_checkpoints(init, policies, out.lerp(i), method="lerp", overwrite=True)


def evaluated(out: RunDir, cfg: Config) -> bool:
    """Whether pareto.parquet holds exactly the run's models, measured with its configured sampler."""
    import pyarrow.parquet as pq

    from warp_rlhf.evaluate import candidates, eval_sampler

    path = out.root / "pareto.parquet"
    if not path.is_file():
        return False
    rows = pq.read_table(path).to_pylist()
    sampler = eval_sampler(cfg).__dict__
    same = all(all(row.get(k) == v for k, v in sampler.items()) for row in rows)
    return same and {r["model"] for r in rows} == {c.label for c in candidates(out, cfg)}


def gather(found: list[Member]) -> Any:  # pa.Table
    """study.parquet: every member's pareto rows, with the arm, its settings and each model's training cost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for member in found:
        cfg = member.cfg
        for row in pq.read_table(member.out.root / "pareto.parquet").to_pylist():
            settings = {"arm": member.arm, "anchor": cfg.warp.anchor, "beta": cfg.warp.beta, "runs": cfg.warp.runs,
                        "iterations": cfg.warp.iterations, "train_samples": train_samples(cfg, row)}  # fmt: skip
            rows.append(settings | row)
    return pa.Table.from_pylist(rows)


def train_samples(cfg: Config, row: dict[str, Any]) -> int:
    """Completions the whole job had generated when the model existed: every run's, earlier iterations included.

    A run's policy after step t of iteration i: M runs × (steps of iterations < i + t) batches; θ_slerp,
    θ_init, the LERP of iteration i and the LITI family: M runs × (steps of iterations ≤ i) batches.
    """
    warp, batch = cfg.warp, cfg.warp.prompts_per_step * cfg.actors.samples_per_prompt
    if row["kind"] == "sft":
        return 0
    before = sum(warp.steps_in(j) for j in range(1, row["iteration"]))
    steps = row["step"] if row["kind"] == "policy" else warp.steps_in(row["iteration"])
    return warp.runs * (before + steps) * batch


WHOLE = "(study)"  # times.json's key for the study's own wall time


class Times:
    """Seconds spent per member and phase, accumulated across invocations in times.json."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, float]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def phase(self, key: str, name: str) -> Iterator[None]:
        """Adds the time spent inside to ``key``'s ``name``, also when it ends in an error or a Ctrl-C."""
        began = time.perf_counter()
        try:
            yield
        finally:
            times = self.load()
            entry = times.setdefault(key, {})
            entry[name] = round(entry.get(name, 0.0) + time.perf_counter() - began, 1)
            write_atomic(self.path, json.dumps(times, indent=1))


def write_report(rows: list[dict[str, Any]], spec: Spec, found: list[Member], times: dict[str, dict[str, float]],
                 wall_s: float, command: str) -> None:  # fmt: skip
    """findings/<finding>.png and report.md: per finding a plot, a table of seed means, its claims and a verdict."""
    from datetime import UTC, datetime

    from warp_rlhf import findings
    from warp_rlhf.hardware import cpu_info, native_bf16_cpu

    decided = findings.decide_all(rows)
    (spec.dir / "findings").mkdir(exist_ok=True)
    spent: dict[str, float] = {}
    for key, entry in times.items():
        for phase, seconds in entry.items() if key != WHOLE else ():
            spent[phase] = spent.get(phase, 0.0) + seconds
    first, cfg = rows[0], found[0].cfg
    prompts = first["samples"] // first["samples_per_prompt"]
    lines = [
        f"# WARP study: {spec.dir.name}",
        "",
        f"- Command: `{command or 'warp-rlhf study --spec ' + str(spec.path)}`",
        f"- Machine: {cpu_info()[0]}, {os.cpu_count()} cores, {native_bf16_cpu() or 'no native bf16 on the CPU'}; "
        f"model {Path(cfg.model.path).name} in {cfg.model.dtype}; "
        f"written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        f"- Wall time: **{times.get(WHOLE, {}).get('wall_s', wall_s) / 60:.1f} min** over every invocation (this "
        f"one: {wall_s / 60:.1f} min), of which "
        + ", ".join(f"{phase.removesuffix('_s')} {seconds / 60:.1f} min" for phase, seconds in sorted(spent.items()))
        + " (start-up of Ray and the actors included).",
        f"- Seeds: {', '.join(str(s) for s in spec.seeds)}. Evaluation: {prompts} held-out prompts × "
        f"{first['samples_per_prompt']} samples at temperature {first['temperature']:g}, top-k "
        f"{'off' if first['top_k'] == -1 else first['top_k']}, at most {first['max_new_tokens']} new tokens; "
        "every model of a seed sampled on the same random streams.",
        "",
        "## Arms",
        "",
        "| arm | anchor | β | M | I | steps per iteration | samples generated | overrides |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, overrides in spec.arms.items():
        w = next(m.cfg for m in found if m.arm == arm).warp
        total = max(r["train_samples"] for r in rows if r["arm"] == arm)
        steps = ", ".join(str(w.steps_in(i)) for i in range(1, w.iterations + 1))
        lines.append(f"| {arm} | {w.anchor} | {w.beta:g} | {w.runs} | {w.iterations} | {steps} | {total} | "
                     f"{' '.join(f'`{o}`' for o in overrides)} |")  # fmt: skip
    lines += ["", "## Verdicts", "", "| finding | the paper says | verdict |", "|---|---|---|"]
    lines += [f"| {f.title} | {f.paper} | **{f.verdict}** |" for f in decided]
    for f in decided:
        findings.plot(f, spec.dir / "findings" / f"{f.key}.png")
        lines += ["", f"## {f.title}", "", f"The paper: {f.paper}. Verdict: **{f.verdict}**.", ""]
        lines += [f"![{f.key}](findings/{f.key}.png)", "", *(c.line() for c in f.claims), ""]
        lines += [findings.table_markdown(f.table)] if f.table else ["No arm of this study measures it."]
        lines += ["", f.note] if f.note else []
    lines += ["", "## How a verdict is decided", "", (findings.__doc__ or "").strip()]
    write_atomic(spec.dir / "report.md", "\n".join(lines) + "\n")
