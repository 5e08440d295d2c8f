"""Output directories: a fresh run writes its resolved config; a resume refuses a different one."""

from pathlib import Path

import pytest
import yaml

from warp_rlhf.config import config_from_dict
from warp_rlhf.outputs import RunDir
from warp_rlhf.resume import ResumeError, prepare_run_dir


def test_fresh_run_writes_config_then_refuses_to_overwrite(tmp_path: Path) -> None:
    out = RunDir(tmp_path / "run")
    cfg = config_from_dict({}, [f"output.dir={out.root}"])
    assert prepare_run_dir(out, cfg, resume=False, force=False) == 0
    assert yaml.safe_load(out.config.read_text())["warp"]["beta"] == 0.1
    with pytest.raises(ResumeError, match="already holds a run; pass --resume"):
        prepare_run_dir(out, cfg, resume=False, force=False)


def test_resume_names_every_differing_key_unless_forced(tmp_path: Path) -> None:
    out = RunDir(tmp_path / "run")
    cfg = config_from_dict({}, [f"output.dir={out.root}"])
    prepare_run_dir(out, cfg, resume=False, force=False)
    out.mark_completed(1)
    assert prepare_run_dir(out, cfg, resume=True, force=False) == 1
    changed = config_from_dict({}, [f"output.dir={out.root}", "warp.beta=0.2", "learners.lr=1e-5"])
    with pytest.raises(ResumeError) as info:
        prepare_run_dir(out, changed, resume=True, force=False)
    assert "learners.lr (1e-06 → 1e-05)" in str(info.value) and "warp.beta (0.1 → 0.2)" in str(info.value)
    assert prepare_run_dir(out, changed, resume=True, force=True) == 1


def test_non_empty_directory_without_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    cfg = config_from_dict({}, [f"output.dir={tmp_path}"])
    with pytest.raises(ResumeError, match="not empty and holds no run"):
        prepare_run_dir(RunDir(tmp_path), cfg, resume=False, force=False)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.train={tmp}/missing.jsonl", "prompt file '{tmp}/missing.jsonl' does not exist"),
        ("data.eval={tmp}/bad.jsonl", "has no column 'prompt'"),
        ("model.path={tmp}/no-model", "does not exist"),
        ("model.dtype=bfloat16 model.path={tmp}/fp32", "stores weights in float32 but model.dtype = bfloat16"),
        ("model.path={tmp}/no-tokenizer", "has no tokenizer (tokenizer.json or tokenizer.model)"),
        ("model.path={tmp}/classifier", "has no *ForCausalLM"),
    ],
)
def test_train_refuses_bad_input_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, override: str, fragment: str
) -> None:
    import json
    import shutil
    import subprocess
    import sys

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    shutil.copytree(tiny_model_dir, tmp_path / "fp32")  # the fp32 tiny model, under a bf16 config
    shutil.copytree(tiny_model_dir, tmp_path / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(tiny_model_dir, tmp_path / "classifier")
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (tmp_path / "classifier" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    args = ["train", "--config", "configs/smoke.yaml", f"output.dir={out}", *override.format(tmp=tmp_path).split()]
    root = Path(__file__).resolve().parents[2]
    # `warp-rlhf train ARGS`, then which of the slow-to-import packages it had imported by then
    code = (
        "import sys; from warp_rlhf.cli import main; rc = main(sys.argv[1:]); "
        "print(sorted({'torch', 'ray', 'vllm', 'deepspeed', 'transformers'} & set(sys.modules))); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=root)
    assert result.returncode == 2
    assert fragment.format(tmp=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written
    assert result.stdout.strip() == "[]"  # the error came before the seconds that importing those takes
