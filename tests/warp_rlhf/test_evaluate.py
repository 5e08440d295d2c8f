"""`warp-rlhf eval` measures the trained policy: the run's sampler, KL at its temperature, the LITI family past 1.

The run directory is built without training (θ_slerp a perturbed θ_sft, θ_init its LITI step), so the
module costs one evaluation of the tiny model through the CLI, with real Ray and vLLM. Sampling as
`eval.*` overrides say, through the CLI: the end-to-end run's evaluation (test_end_to_end.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from warp_rlhf.config import ConfigError, config_from_dict, dump_config
from warp_rlhf.evaluate import eval_sampler, liti_family

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["sft", "iter-1/slerp", "iter-1/init", "liti η'=0", "liti η'=1", "liti η'=1.5"]


def test_eval_samples_with_the_runs_settings_unless_overridden() -> None:
    run = {
        "seed": 5,
        "actors": {"temperature": 0.7, "top_k": 20, "max_new_tokens": 9},
        "eval": {"samples_per_prompt": 3},
    }
    sampler = eval_sampler(config_from_dict(run))
    assert (sampler.temperature, sampler.top_k, sampler.samples_per_prompt, sampler.max_new_tokens, sampler.seed) == (
        0.7, 20, 3, 9, 5
    )  # fmt: skip
    overridden = eval_sampler(config_from_dict(run, ["eval.temperature=1.0", "eval.top_k=-1"]))
    assert (overridden.temperature, overridden.top_k) == (1.0, -1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.etas=[0.5, 2.5]", "eval.etas = \\[0.5, 2.5\\]: must be values in \\[0, 2\\]"),
        ("eval.temperature=-0.5", "eval.temperature = -0.5: must be > 0, or 0 for the run's actors.temperature"),
        ("eval.top_k=-2", "eval.top_k = -2: must be 0 \\(the run's actors.top_k\\), -1 \\(off\\) or >= 1"),
    ],
)
def test_eval_settings_are_validated(override: str, message: str) -> None:
    assert config_from_dict({}, ["eval.etas=[0, 1, 1.5, 2]"]).eval.etas == (0.0, 1.0, 1.5, 2.0)
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


def test_liti_family_is_exact_at_0_and_1_and_extrapolates_past_1() -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    sft = {"w": torch.randn(3, 70_000, generator=generator), "b": torch.randn(5, generator=generator)}
    slerp = {name: t + torch.randn(t.shape, generator=generator) for name, t in sft.items()}
    for name in sft:
        assert torch.equal(liti_family(sft, slerp, 0.0)[name], sft[name])
        assert torch.equal(liti_family(sft, slerp, 1.0)[name], slerp[name])
        expected = sft[name] + 1.5 * (slerp[name] - sft[name])
        torch.testing.assert_close(liti_family(sft, slerp, 1.5)[name], expected, rtol=1e-6, atol=1e-6)


def test_only_the_ends_of_the_liti_family_reuse_another_models_samples_and_a_lerp_is_evaluated(tmp_path: Path) -> None:
    from warp_rlhf.evaluate import candidates
    from warp_rlhf.outputs import RunDir

    for i in (1, 2):
        for kind in ("slerp", "init", "lerp") if i == 1 else ("slerp", "init"):  # a study merged iteration 1's LERP
            (tmp_path / f"iter-{i}" / kind).mkdir(parents=True)
            for name in ("config.json", "model.safetensors"):
                (tmp_path / f"iter-{i}" / kind / name).write_bytes(b"")
    cfg = config_from_dict({"model": {"path": str(tmp_path / "sft")}, "warp": {"iterations": 2, "steps": 1},
                            "eval": {"etas": [0.0, 0.5, 1.0, 1.5]}})  # fmt: skip
    found = {c.label: c.same_as for c in candidates(RunDir(tmp_path), cfg)}
    assert found == {"sft": None, "iter-1/slerp": None, "iter-1/init": None, "iter-1/lerp": None, "iter-2/slerp": None,
                     "iter-2/init": None, "liti η'=0": "sft", "liti η'=0.5": None, "liti η'=1": "iter-2/slerp",
                     "liti η'=1.5": None}  # fmt: skip


def test_snapshots_are_evaluated_with_their_runs_final_policy(tmp_path: Path) -> None:
    from warp_rlhf.evaluate import candidates
    from warp_rlhf.outputs import RunDir

    out = RunDir(tmp_path)
    made = [out.slerp(1), out.init(1), out.snapshot(1, 2, 4), out.snapshot(1, 2, 8), out.snapshot(1, 1, 4),
            out.iteration(1) / "snapshots" / "run-1-step-6"]  # fmt: skip
    for directory in made:
        directory.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (directory / name).write_bytes(b"")
    (out.iteration(1) / "snapshots" / "run-1-step-6" / "config.json").unlink()  # incomplete: left out
    cfg = config_from_dict({"model": {"path": str(tmp_path / "sft")}, "warp": {"iterations": 1, "steps": 10},
                            "eval": {"etas": [0.5]}})  # fmt: skip
    found = [(c.label, c.kind, c.run, c.step) for c in candidates(out, cfg) if c.kind == "policy"]
    assert found == [("iter-1/run-1@4", "policy", 1, 4), ("iter-1/run-1@10", "policy", 1, 10),
                     ("iter-1/run-2@4", "policy", 2, 4), ("iter-1/run-2@8", "policy", 2, 8),
                     ("iter-1/run-2@10", "policy", 2, 10)]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One completed iteration: θ_slerp = θ_sft + noise, θ_init = LITI(θ_sft, θ_slerp, 0.3)."""
    import torch

    from merger import liti, load_flat, save_hf

    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = config_from_dict({
        "seed": 3,
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "actors": {"num_cpus": 0.5, "max_model_len": 128, "kv_cache_gib": 0.125, "max_new_tokens": 12,
                   "temperature": 0.9, "top_k": 50},
        "warp": {"iterations": 1, "runs": 1, "steps": 1, "prompts_per_step": 4},
        "eval": {"samples_per_prompt": 4, "max_prompts": 8, "etas": [0.0, 1.0, 1.5]},
        "output": {"dir": str(out)},
    })  # fmt: skip
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    sft = load_flat(tiny_model_dir).state_dict()
    generator = torch.Generator().manual_seed(7)
    slerp = {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in sft.items()}
    save_hf(slerp, out / "iter-1" / "slerp", tiny_model_dir)
    save_hf(liti(sft, slerp, 0.3), out / "iter-1" / "init", tiny_model_dir)
    return out


def _eval(run: Path, *overrides: str) -> tuple[list[dict], str]:
    result = subprocess.run([sys.executable, "-m", "warp_rlhf", "eval", "--run", str(run), *overrides], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return pq.read_table(run / "pareto.parquet").to_pylist(), result.stdout


@pytest.mark.ray
@pytest.mark.vllm
def test_eval_measures_the_trained_sampler_and_the_liti_family(run_dir: Path) -> None:
    front, stdout = _eval(run_dir)
    rows = {r["model"]: r for r in front}
    assert [r["model"] for r in front] == LABELS
    for r in front:  # the run's settings, stated in every row
        assert (r["temperature"], r["top_k"], r["samples_per_prompt"], r["max_new_tokens"]) == (0.9, 50, 4, 12)
        assert r["samples"] == 8 * 4
    assert "sampled at temperature 0.9, top-k 50, 4 samples per prompt" in stdout
    assert rows["sft"]["kl"] == 0.0 and rows["sft"]["kl_se"] == 0.0
    # η' = 0 and η' = 1 are θ_sft and θ_slerp bit for bit (liti_family, tested above): sampled once, rows repeated.
    assert rows["liti η'=0"] | {"model": "sft", "kind": "sft", "iteration": 0} == rows["sft"] | {"eta": 0.0}
    same = ("reward", "reward_se", "kl", "kl_se")
    assert {k: rows["liti η'=1"][k] for k in same} == {k: rows["iter-1/slerp"][k] for k in same}
    assert 0 < rows["iter-1/init"]["kl"] < rows["iter-1/slerp"]["kl"] < rows["liti η'=1.5"]["kl"]
    for label in ("iter-1/init", "iter-1/slerp", "liti η'=1.5"):
        assert rows[label]["kl"] > 2 * rows[label]["kl_se"], rows[label]


@pytest.mark.parametrize(("shared", "engines"), [(False, 4), (True, 2)])
def test_eval_uses_the_trainings_engine_slots_as_full_model_engines(shared: bool, engines: int) -> None:
    """K engines per run (K in all when the runs shared them), placed as one run's, with no LoRA slots."""
    from warp_rlhf.config import config_from_dict
    from warp_rlhf.evaluate import eval_shape
    from warp_rlhf.placement import group_specs

    lora = ["learners.lora.rank=8", f"actors.share_engines={str(shared).lower()}"]
    cfg = config_from_dict({}, ["actors.engines_per_run=2", "warp.runs=2", *lora])
    actors, shape = eval_shape(cfg)
    assert actors.engines_per_run == engines and not actors.share_engines
    names = [spec.name for spec in group_specs(shape, []) if spec.role == "engine"]
    assert names == [f"run-1/engine-{k}" for k in range(1, engines + 1)]  # what evaluate() asks the placement for
