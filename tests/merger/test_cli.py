"""`warp-rlhf merge`: outputs, and one line with exit code 2 for every bad input, nothing written."""

from __future__ import annotations

import json
import re

import pytest
import torch

from merger import load_flat, merge_checkpoints
from warp_rlhf.cli import main


def _merge(*args) -> int:
    return main(["merge", *map(str, args)])


def test_merge_writes_a_loadable_directory(tiny_model_dir, make_policies, tmp_path, capsys) -> None:
    p1, p2 = make_policies(2)
    assert (
        _merge("--init", tiny_model_dir, "--policy", p1, "--policy", p2, "--eta", 0.3, "--out", tmp_path / "out") == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    merge_checkpoints(tiny_model_dir, [p1, p2], tmp_path / "api", eta=0.3)
    assert load_flat(tmp_path / "out").buffer.tobytes() == load_flat(tmp_path / "api").buffer.tobytes()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_lerp_of_three_with_sharding(tiny_model_dir, make_policies, tmp_path) -> None:
    dirs = make_policies(3)
    args = ["--init", tiny_model_dir, *sum((["--policy", d] for d in dirs), []), "--method", "lerp"]
    assert _merge(*args, "--shard-size-mb", 1, "--out", tmp_path / "out") == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lam", "1.5"], r"lam = 1.5: must be in \[0, 1\]"),
        (["--eta", "2"], r"eta = 2.0: must be in \[0, 1\]"),
        (["--method", "lerp", "--lam", "0.5"], "only for SLERP of two policies"),
        (["--policy", "{policy}", "--lam", "0.3"], "only for SLERP of two policies"),
        (["--policy", "{missing}"], "does not exist"),
        (["--policy", "{pickle}"], r"only pickle weights \(\*\.bin\)"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tiny_model_dir, make_policies, bf16_init_dir, tmp_path, capsys, extra, message
):
    p1, p2 = make_policies(2)
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text("{}")
    (pickle / "pytorch_model.bin").write_bytes(b"x")
    names = {"policy": p1, "missing": tmp_path / "missing", "pickle": pickle, "bf16": bf16_init_dir}
    extra = [e.format(**names) for e in extra]
    assert _merge("--init", tiny_model_dir, "--policy", p1, "--policy", p2, *extra, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warp-rlhf: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pickle"]  # no temporary directory left either


def test_existing_output_and_missing_arguments_exit_2(tiny_model_dir, make_policies, tmp_path, capsys) -> None:
    (tmp_path / "out").mkdir()
    p1, p2 = make_policies(2)
    assert _merge("--init", tiny_model_dir, "--policy", p1, "--policy", p2, "--out", tmp_path / "out") == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _merge("--init", tiny_model_dir, "--policy", p1)
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
