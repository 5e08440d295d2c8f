"""The merger service: in-process Merger, its Ray-actor form (parity), outputs per the contract, light import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from merger import CheckpointError, FlatWeights, Merger, MergerService, load_flat, merge_checkpoints
from merger.checkpoint import Checkpoint
from warp_rlhf.config import Config, MergerConfig, OutputConfig, WarpConfig


def _config(out_dir, **merger) -> Config:
    return Config(output=OutputConfig(dir=str(out_dir)), merger=MergerConfig(**merger), warp=WarpConfig(eta=0.3))


def test_merge_writes_the_iteration_and_returns_the_new_init(tiny_model_dir, make_policies, tmp_path) -> None:
    dirs = make_policies(2)
    new_init = Merger(_config(tmp_path / "run"), tiny_model_dir).merge(
        2, load_flat(tiny_model_dir), [load_flat(d) for d in dirs]
    )
    merge_checkpoints(tiny_model_dir, dirs, tmp_path / "init", eta=0.3, merged_dir=tmp_path / "slerp")
    iteration = tmp_path / "run" / "iter-2"
    assert sorted(p.name for p in iteration.iterdir()) == ["init", "slerp"]
    for kind in ("init", "slerp"):  # the same bytes as the offline merge of the same directories
        assert np.array_equal(load_flat(iteration / kind).buffer, load_flat(tmp_path / kind).buffer)
        assert (iteration / kind / "tokenizer.json").is_file()
    assert isinstance(new_init, FlatWeights)
    assert np.array_equal(new_init.buffer, load_flat(iteration / "init").buffer)


def test_directory_inputs_and_reruns(tiny_model_dir, make_policies, tmp_path) -> None:
    dirs = make_policies(3)
    merger = Merger(_config(tmp_path / "run", granularity="global"), tiny_model_dir)
    from_flat = merger.merge(1, load_flat(tiny_model_dir), [load_flat(d) for d in dirs])
    from_dirs = merger.merge(1, tiny_model_dir, dirs)  # a rerun replaces the iteration's outputs
    assert np.array_equal(from_flat.buffer, from_dirs.buffer)
    assert not [p for p in (tmp_path / "run" / "iter-1").iterdir() if p.name.startswith(".")]


def test_fp32_policies_over_a_bf16_init_merge_into_fp32(tiny_model_dir, make_policies, bf16_init_dir, tmp_path):
    """fp32 policies (the learners' master weights) over a bf16 θ_init: the merge is the masters' next value and
    stays fp32, outputs and returned θ_init alike. (Rounded to θ_init's bf16, the demo's iteration 1 kept a fifth
    of its LITI update.) The same as merging over θ_init upcast to fp32 exactly, byte for byte."""
    from merger.flat import flatten

    policies = make_policies(2)
    new_init = Merger(_config(tmp_path / "a"), tiny_model_dir).merge(1, bf16_init_dir, policies)
    upcast = flatten((name, t.float()) for name, t in load_flat(bf16_init_dir).tensors())
    expected = Merger(_config(tmp_path / "b"), tiny_model_dir).merge(1, upcast, policies)
    assert {spec.dtype for spec in new_init.specs} == {"float32"}
    assert np.array_equal(new_init.buffer, expected.buffer)
    # `warp-rlhf merge` (merge_checkpoints) widens the same way: the study's LERP arms and offline merges agree.
    merge_checkpoints(bf16_init_dir, policies, tmp_path / "init", eta=0.3, merged_dir=tmp_path / "slerp")
    for kind in ("init", "slerp"):
        with Checkpoint(tmp_path / "a" / "iter-1" / kind) as saved:
            assert {dtype for dtype, _ in saved.layout.values()} == {"float32"}
        saved = load_flat(tmp_path / "a" / "iter-1" / kind).buffer
        assert np.array_equal(saved, load_flat(tmp_path / "b" / "iter-1" / kind).buffer)
        assert np.array_equal(saved, load_flat(tmp_path / kind).buffer)


def test_policies_no_wider_than_init_merge_into_its_dtype(tiny_model_dir, make_policies, bf16_init_dir, tmp_path):
    """Policies no wider than θ_init (bf16 checkpoints over a bf16 θ_init): nothing is widened."""
    import torch

    new_init = Merger(_config(tmp_path / "run"), tiny_model_dir).merge(
        1, bf16_init_dir, make_policies(2, torch.bfloat16)
    )
    assert {spec.dtype for spec in new_init.specs} == {"bfloat16"}


def test_mismatched_inputs_are_refused_before_writing(tiny_model_dir, tmp_path) -> None:
    merger = Merger(_config(tmp_path / "run"), tiny_model_dir)
    with pytest.raises(CheckpointError, match="no policies"):
        merger.merge(1, tiny_model_dir, [])
    with pytest.raises(CheckpointError, match="cannot merge a dict"):
        merger.merge(1, tiny_model_dir, [{}])
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_ray_actor_gives_the_same_bytes_as_in_process(ray_cluster, tiny_model_dir, make_policies, tmp_path) -> None:
    ray = ray_cluster
    dirs = make_policies(2)
    init, policies = load_flat(tiny_model_dir), [load_flat(d) for d in dirs]
    local = Merger(_config(tmp_path / "local"), tiny_model_dir).merge(1, init, policies)
    service = MergerService(_config(tmp_path / "remote"), tiny_model_dir)
    try:
        summary = ray.get(service.merge(1, ray.put(init), [ray.put(p) for p in policies]))  # object references in
    finally:
        service.shutdown()
    assert summary["init"] == str((tmp_path / "remote" / "iter-1" / "init").resolve())
    assert summary["tensors"] == len(local.specs) and summary["peak_rss_bytes"] > 0
    assert np.array_equal(load_flat(summary["init"]).buffer, local.buffer)  # the directory is θ_init, bit for bit
    for kind in ("slerp", "init"):
        with (
            Checkpoint(tmp_path / "remote" / "iter-1" / kind) as a,
            Checkpoint(tmp_path / "local" / "iter-1" / kind) as b,
        ):
            assert a.layout == b.layout
        assert np.array_equal(
            load_flat(tmp_path / "remote" / "iter-1" / kind).buffer,
            load_flat(tmp_path / "local" / "iter-1" / kind).buffer,
        )


def test_importing_merger_imports_nothing_heavy() -> None:
    code = (
        "import sys, merger\n"
        "from merger import CheckpointError, FlatWeights\n"
        "import merger.checkpoint, merger.errors, merger.flat\n"
        "print(sorted(m for m in ('torch', 'ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout == "[]\n"
