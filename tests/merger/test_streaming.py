"""The streaming merge of HF directories: same numbers as the pure maths, bounded memory, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merger import CheckpointError, lerp, liti, merge_checkpoints, save_hf, slerp
from merger import streaming as streaming_module
from merger.checkpoint import Checkpoint, CheckpointWriter


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as checkpoint:
        return {name: checkpoint.tensor(name) for name in checkpoint.entries}


def _assert_same(got: dict, expected: dict, exact: bool = False) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        if exact:
            assert torch.equal(got[name], expected[name]), name
        else:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_slerp_then_liti_matches_the_pure_functions(tiny_model_dir, tiny_weights, make_policies, tmp_path) -> None:
    dirs = make_policies(2)
    policies = [_read_all(d) for d in dirs]
    out = merge_checkpoints(tiny_model_dir, dirs, tmp_path / "init", eta=0.3, merged_dir=tmp_path / "slerp")
    merged = slerp(tiny_weights, policies)
    _assert_same(_read_all(tmp_path / "slerp"), merged, exact=True)
    _assert_same(_read_all(out), liti(tiny_weights, merged, 0.3))
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "pure"),
    [
        ({"lam": 0.25}, lambda i, p: slerp(i, p[:2], lam=0.25)),
        ({"granularity": "global"}, lambda i, p: slerp(i, p[:2], granularity="global")),
        ({"method": "lerp"}, lambda i, p: lerp(i, p[:2])),
    ],
)
def test_methods_and_options_match_the_pure_functions(
    tiny_model_dir, tiny_weights, make_policies, tmp_path, kwargs, pure
):
    dirs = make_policies(2)
    merge_checkpoints(tiny_model_dir, dirs, tmp_path / "out", **kwargs)
    _assert_same(_read_all(tmp_path / "out"), pure(tiny_weights, [_read_all(d) for d in dirs]), exact=True)


def test_three_and_one_policies(tiny_model_dir, tiny_weights, make_policies, tmp_path) -> None:
    dirs = make_policies(3)
    merge_checkpoints(tiny_model_dir, dirs, tmp_path / "three")
    _assert_same(_read_all(tmp_path / "three"), slerp(tiny_weights, [_read_all(d) for d in dirs]), exact=True)
    merge_checkpoints(tiny_model_dir, dirs[:1], tmp_path / "one")
    _assert_same(_read_all(tmp_path / "one"), _read_all(dirs[0]), exact=True)


def test_bfloat16_checkpoints_stay_bfloat16(bf16_init_dir, make_policies, tmp_path) -> None:
    dirs = make_policies(2, torch.bfloat16)
    merge_checkpoints(bf16_init_dir, dirs, tmp_path / "out", eta=0.5)
    init, policies = _read_all(bf16_init_dir), [_read_all(d) for d in dirs]
    expected = liti(init, slerp(init, policies), 0.5)  # rounds θ_slerp to bf16 first: one bf16 ulp apart
    got = _read_all(tmp_path / "out")
    for name in init:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].float(), expected[name].float(), atol=1e-2, rtol=1e-2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_architecture_mismatches_are_refused_before_writing(tiny_model_dir, tiny_weights, make_policies, tmp_path):
    good = make_policies(2)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    other_type = save_hf(tiny_weights, tmp_path / "other-type", tiny_model_dir)
    (other_type / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    cases = {
        other_type: "model_type 'mistral' differs",
        _variant(
            tiny_model_dir, tiny_weights, tmp_path / "fewer", drop="model.norm.weight"
        ): "'model.norm.weight'.*missing",
        _variant(
            tiny_model_dir, tiny_weights, tmp_path / "shape", reshape="model.norm.weight"
        ): "'model.norm.weight' has shape",
    }
    for bad, match in cases.items():
        with pytest.raises(CheckpointError, match=match):
            merge_checkpoints(tiny_model_dir, [good[0], bad], tmp_path / "out", merged_dir=tmp_path / "merged")
        assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _variant(reference: Path, weights: dict, out: Path, drop="", reshape="", dtype="") -> Path:
    """``weights`` with one tensor dropped, reshaped or cast, written bypassing save_hf's own check."""
    changed = {n: t for n, t in weights.items() if n != drop}
    if reshape:
        changed[reshape] = changed[reshape][:-1]
    if dtype:
        changed[dtype] = changed[dtype].double()
    layout = {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in changed.items()}
    with CheckpointWriter(out, layout, reference) as writer:
        for name, t in changed.items():
            writer.write(name, t)
    return out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": 0.5, "method": "lerp"}, "only for SLERP of two policies"),
        ({"lam": 2.0}, r"lam = 2.0: must be in \[0, 1\]"),
        ({"eta": -1.0}, r"eta = -1.0: must be in \[0, 1\]"),
        ({"method": "ties"}, "method 'ties'"),
        ({"granularity": "row"}, "granularity 'row'"),
        ({"shard_size_mb": 0}, "shard size 0 MB"),
    ],
)
def test_bad_requests_are_refused(tiny_model_dir, make_policies, tmp_path, kwargs, match) -> None:
    with pytest.raises(CheckpointError, match=match):
        merge_checkpoints(tiny_model_dir, make_policies(2), tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_exist_or_are_inputs_are_refused(tiny_model_dir, make_policies, tmp_path) -> None:
    dirs = make_policies(2)
    with pytest.raises(CheckpointError, match="is also an input"):
        merge_checkpoints(tiny_model_dir, dirs, dirs[1], overwrite=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        merge_checkpoints(tiny_model_dir, dirs, tmp_path / "out")


def test_an_exception_mid_merge_leaves_no_output(tiny_model_dir, make_policies, tmp_path, monkeypatch) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    original = streaming_module.add_task_vectors
    monkeypatch.setattr(streaming_module, "add_task_vectors", failing)
    with pytest.raises(RuntimeError, match="injected"):
        merge_checkpoints(tiny_model_dir, make_policies(2), tmp_path / "out", eta=0.3, merged_dir=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


MEMORY_PROBE = """
import sys, torch
from merger.streaming import merge_checkpoints
torch.ones(1 << 20).sum()  # thread pools and allocator up before the baseline

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
base = status("VmRSS:")
merge_checkpoints(sys.argv[1], sys.argv[2:4], sys.argv[4], eta=0.3, granularity=sys.argv[5])
print(status("VmHWM:") - base)
"""


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_peak_memory_stays_far_under_the_models(tmp_path_factory, granularity) -> None:
    root = tmp_path_factory.getbasetemp() / "memory-models"
    dirs = [root / name for name in ("init", "p1", "p2")]
    if not root.exists():
        for seed, path in enumerate(dirs):
            _synthetic_model(path, seed)
    model_bytes = Checkpoint(dirs[0]).nbytes
    out = tmp_path_factory.mktemp("memory-out") / "out"
    probe = [sys.executable, "-c", MEMORY_PROBE, *map(str, dirs), str(out), granularity]
    peak = int(subprocess.run(probe, check=True, capture_output=True, text=True).stdout)
    # 3 inputs of 48 MiB: holding whole models would need 144 MiB or more; we hold ~8 tensors of 1 MiB, plus
    # whatever the merge's first calls import and page in (18.4 MiB once, beside other tests): under half a model.
    assert peak < model_bytes / 2, f"peak RSS growth {peak / 2**20:.1f} MiB"
    assert Checkpoint(out).nbytes == model_bytes


def _synthetic_model(path: Path, seed: int, tensors: int = 48) -> None:
    """A 48 MiB model of 1 MiB fp32 tensors, written one tensor at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = path.parent / "reference"
    reference.mkdir(exist_ok=True)
    (reference / "config.json").write_text('{"model_type": "synthetic"}')
    layout = {f"layers.{i}.weight": ("float32", (256, 1024)) for i in range(tensors)}
    generator = torch.Generator().manual_seed(seed)
    with CheckpointWriter(path, layout, reference) as writer:
        for name in layout:
            writer.write(name, torch.randn(256, 1024, generator=generator))
