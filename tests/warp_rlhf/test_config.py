"""Typed configuration: paper defaults, YAML + overrides, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from warp_rlhf.config import Config, ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_values() -> None:
    c = Config()
    assert (c.warp.iterations, c.warp.runs, c.warp.beta, c.warp.mu, c.warp.eta, c.warp.lam) == (
        5,
        2,
        0.1,
        0.01,
        0.3,
        0.5,
    )
    assert c.warp.steps == (9000, 7000, 7000, 5000, 5000)
    assert c.warp.prompts_per_step == 128
    assert (c.learners.lr, c.learners.warmup_steps, c.learners.baseline) == (1e-6, 100, "rloo")
    assert (c.actors.temperature, c.actors.top_k) == (0.9, 50)


def test_overrides_apply_in_order_and_parse_yaml_values() -> None:
    c = config_from_dict(
        {"warp": {"iterations": 2, "steps": 3}},
        ["learners.lr=2e-6", "warp.steps=[4, 5]", "actors.weight_transport=collective", "model.path=/x"],
    )
    assert c.learners.lr == 2e-6
    assert c.warp.steps == (4, 5) and c.warp.steps_in(2) == 5
    assert c.actors.weight_transport == "collective"
    assert c.model.path == "/x"


def test_yaml_round_trips_through_dump(tmp_path: Path) -> None:
    c = config_from_dict({"warp": {"beta": 0.05}}, ["learners.adam_betas=[0.8, 0.99]"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(c))
    assert load_config(path) == c


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("warp.beta=-0.1", "warp.beta = -0.1: must be >= 0"),
        ("warp.mu=0", "warp.mu = 0.0: must be in (0, 1]"),
        ("warp.mu=1.5", "warp.mu = 1.5"),
        ("warp.eta=1.2", "warp.eta = 1.2: must be in [0, 1]"),
        ("warp.runs=0", "warp.runs = 0"),
        ("warp.iterations=0", "warp.iterations = 0"),
        ("warp.steps=0", "warp.steps = [0]"),
        ("actors.temperature=0", "actors.temperature = 0.0: must be > 0"),
        ("learners.zero_stage=4", "learners.zero_stage = 4"),
        ("learners.lr=-1e-5", "learners.lr = -1e-05"),
        ("learners.baseline=ppo", "learners.baseline = 'ppo'"),
        ("actors.samples_per_prompt=1", "actors.samples_per_prompt = 1"),
        ("warp.beta=abc", "warp.beta = 'abc': must be a number"),
        ("warp.runs=1.5", "warp.runs = 1.5: must be an integer"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["learners.lora.rank=-1"], "learners.lora.rank = -1: must be >= 0"),
        (["learners.lora.rank=8", "learners.lora.dropout=0.05"], "learners.lora.dropout = 0.05: must be 0"),
        (["learners.lora.target_modules=[]"], "learners.lora.target_modules = []"),
        (["learners.lora.target_modules=[model.q_proj]"], "learners.lora.target_modules = ['model.q_proj']"),
        (["learners.lora.alpha=0"], "learners.lora.alpha = 0.0: must be > 0"),
        (["learners.lora.rank=8", "learners.zero_stage=3"], "learners.zero_stage = 3: must be 0, 1 or 2 with"),
        (["learners.lora.rank=8", "learners.anchor_on_cpu=true"], "learners.anchor_on_cpu = True: must be false"),
        (["actors.share_engines=true"], "actors.share_engines = True: must be false unless learners.lora.rank > 0"),
        (
            ["learners.lora.rank=8", "warp.anchor=sft", "warp.iterations=2", "warp.steps=4"],
            "warp.iterations = 2: must be 1",
        ),
    ],
)
def test_lora_settings_that_cannot_work_are_refused(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert fragment in str(info.value)


def test_lora_targets_must_be_linear_layers_of_the_model(tiny_model_dir: Path) -> None:
    from warp_rlhf.models import ModelError, check_model_matches

    check_model_matches(tiny_model_dir, "float32", ("q_proj", "down_proj"))
    with pytest.raises(ModelError, match=r"no linear layer named 'qkv'; its 2-D weights are named .*q_proj"):
        check_model_matches(tiny_model_dir, "float32", ("q_proj", "qkv"))


def test_unknown_key_names_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'warp.bta' in warp; valid keys: iterations, runs"):
        config_from_dict({"warp": {"bta": 1}})
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'"):
        config_from_dict({"trainer": {}})


def test_missing_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("warp: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    load_config(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warp_rlhf", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_config_show_prints_override() -> None:
    result = _cli("config", "show", "--config", "configs/demo.yaml", "learners.lr=2e-6")
    assert result.returncode == 0, result.stderr
    assert "lr: 2.0e-06" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("warp.bta=1",), "unknown key 'warp.bta'"),
        (("warp.eta=2",), "warp.eta = 2.0: must be in [0, 1]"),
        (("--config", "missing.yaml"), "does not exist"),
        (("novalue",), "expected key.sub=value"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: tuple[str, ...], fragment: str) -> None:
    result = _cli("config", "show", *args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_overrides_may_follow_an_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`train --config c.yaml --resume warp.beta=x`: the override after --resume is read, and checked."""
    from warp_rlhf.cli import main

    assert main(["train", "--config", "configs/smoke.yaml", "--resume", "warp.beta=x"]) == 2
    assert "warp.beta = 'x': must be a number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", "configs/smoke.yaml", "--resume", "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_anchor_is_ema_or_sft() -> None:
    assert config_from_dict({"warp": {"anchor": "sft", "steps": 1}}).warp.anchor == "sft"
    with pytest.raises(ConfigError, match=r"warp.anchor = 'fixed': must be ema or sft"):
        config_from_dict({"warp": {"anchor": "fixed", "steps": 1}})


def test_policy_every_is_zero_or_a_step_count() -> None:
    assert config_from_dict({"output": {"policy_every": 4}, "warp": {"steps": 1}}).output.policy_every == 4
    with pytest.raises(ConfigError, match=r"output.policy_every = -1: must be >= 0 \(0: only the final\)"):
        config_from_dict({"output": {"policy_every": -1}, "warp": {"steps": 1}})


@pytest.mark.parametrize(
    ("overrides", "shares"),
    [
        ([], True),  # CPU ranks, ZeRO 0: one pass per prompt measured faster (README, Benchmarks)
        (["learners.zero_stage=2"], True),
        (["learners.zero_stage=3"], False),  # two passes gather the parameters twice
        (["learners.num_gpus=1"], False),  # on an H200, 1.25-1.46x slower shared
        (["learners.num_gpus=1", "learners.share_prompts=true"], True),  # an explicit choice is kept
        (["learners.share_prompts=false"], False),
    ],
)
def test_share_prompts_auto_resolves_by_where_the_ranks_compute(overrides: list[str], shares: bool) -> None:
    learners = config_from_dict({}, overrides).learners
    assert learners.shares_prompts is shares


def test_share_prompts_is_auto_true_or_false() -> None:
    assert Config().learners.share_prompts == "auto"
    for bad in ("learners.share_prompts=1", "learners.share_prompts=sometimes"):
        with pytest.raises(ConfigError, match=r"learners.share_prompts = .*: must be one of auto, true, false"):
            config_from_dict({}, [bad])
