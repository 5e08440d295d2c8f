"""`warp-rlhf study`: a bad spec or arm is one line before any run; the smoke study end to end, then resumed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from warp_rlhf.config import ConfigError
from warp_rlhf.study import StudyError, check_inputs, load_spec, members

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "studies" / "smoke.yaml"


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load(SMOKE.read_text()) | {"config": str(ROOT / "configs" / "smoke.yaml")} | changes
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arm": {}}, "unknown key 'arm' in study spec"),
        ({"arms": {}}, "arms: must map each arm's name"),
        ({"arms": {"a/b": []}}, "arm name 'a/b'"),
        ({"arms": {"warp": ["warp.beta=-1"]}}, "arm 'warp': warp.beta = -1"),
        ({"arms": {"warp": ["seed=3"]}}, "the study sets seed and output.dir itself"),
        ({"seeds": [0, 0]}, "seeds = [0, 0]: must be a non-empty list of distinct integers"),
        ({"config": "missing.yaml"}, "does not exist (relative to the spec)"),
        ({"arms": {"a": [], "b": ["eval.max_prompts=4"]}}, "arms 'a' and 'b' differ in eval.max_prompts (8 vs 4)"),
        ({"arms": {"a": [], "b": ["actors.temperature=0.7"]}}, "arms differ in actors.temperature: set eval"),
    ],
)
def test_spec_and_arm_errors_name_what_is_wrong(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(StudyError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        members(load_spec(write_spec(tmp_path, **changes), dir=str(tmp_path / "study")))


def test_a_run_directory_holding_another_config_stops_the_study_before_any_run(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path), dir=str(tmp_path / "study"))
    first, second = check_inputs(members(spec))
    second.out.root.mkdir(parents=True)
    second.out.config.write_text(yaml.safe_dump(first.cfg.to_dict() | {"seed": 5}))
    with pytest.raises(ConfigError, match=r"arm 'rloo', seed 0: .* holds a run with another config: .*seed \(5 → 0\)"):
        check_inputs(members(spec))
    assert not first.out.root.exists()


def test_the_command_line_says_one_line_and_writes_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, arms={"warp": ["warp.anchor=fixed"]})
    result = subprocess.run([sys.executable, "-m", "warp_rlhf", "study", "--spec", str(spec), "--dir",
                             str(tmp_path / "study")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "warp-rlhf: error: arm 'warp': warp.anchor = 'fixed': must be ema or sft"
    ]
    assert not (tmp_path / "study").exists()


def _study(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warp_rlhf", "study", "--spec", str(SMOKE), "--dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_the_smoke_study_trains_merges_evaluates_and_reports_then_resumes_without_work(tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = _study(out)
    assert result.returncode == 0, result.stderr[-4000:]
    # Both arms trained and evaluated on one local Ray instance, not one per train and eval.
    assert result.stderr.count("Started a local Ray instance") == 1, result.stderr[-4000:]
    rows = pq.read_table(out / "study.parquet").to_pylist()
    for column in ("arm", "seed", "model", "kind", "eta", "step", "reward", "reward_se", "kl", "kl_se",
                   "train_samples", "anchor", "beta"):  # fmt: skip
        assert column in rows[0], column
    by = {(r["arm"], r["model"]): r for r in rows}
    # Both arms were trained on the same number of samples: 2 runs × 2 steps, and 1 run × 4 steps.
    assert by["warp", "iter-1/slerp"]["train_samples"] == by["rloo", "iter-1/run-1@4"]["train_samples"] == 4 * 4 * 2
    assert {r["kind"] for r in rows if r["arm"] == "warp"} == {"sft", "slerp", "init", "lerp", "policy", "liti"}
    assert not [r for r in rows if r["arm"] == "rloo" and r["kind"] == "lerp"]  # one run: nothing to LERP
    for arm in ("warp", "rloo"):  # the ends of the LITI family are those models, bit for bit
        for eta, model in ((1.0, "iter-1/slerp"), (0.0, "sft")):
            end = next(r for r in rows if r["arm"] == arm and r["eta"] == eta)
            assert (end["reward"], end["kl"]) == (by[arm, model]["reward"], by[arm, model]["kl"])
    # The arms share θ_sft, the prompts and the seed: θ_sft's row is the same in both.
    assert (by["warp", "sft"]["reward"], by["warp", "sft"]["kl"]) == (by["rloo", "sft"]["reward"], 0.0)
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in rows)
    for key in ("anchor", "merge", "liti", "iterations", "rloo"):
        assert (out / "findings" / f"{key}.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert report.count("Verdict: **") == 5 and "](findings/rloo.png)" in report
    assert f"warp-rlhf study --spec {SMOKE} --dir {out}" in report

    def work() -> dict:  # seconds per run and phase, without the study's own wall time
        return {key: phases for key, phases in json.loads((out / "times.json").read_text()).items() if "/" in key}

    trained = work()
    assert set(trained) == {"warp/seed-0", "rloo/seed-0"}
    began = time.perf_counter()
    again = _study(out)  # everything is done: no run is trained, merged or evaluated again
    assert again.returncode == 0, again.stderr[-4000:]
    assert time.perf_counter() - began < 60
    assert work() == trained
    assert repr(pq.read_table(out / "study.parquet").to_pylist()) == repr(rows)  # repr: NaN η′ compare equal
