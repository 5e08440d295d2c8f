"""HF safetensors checkpoints: reading (single, sharded, third-party), atomic writing, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from merger import CheckpointError, flatten, load_flat, save_hf
from merger.checkpoint import Checkpoint, CheckpointWriter


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as checkpoint:
        return {name: checkpoint.tensor(name) for name in checkpoint.entries}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_round_trip_single_file_matches_the_safetensors_library(tiny_model_dir, tiny_weights, tmp_path) -> None:
    out = save_hf(tiny_weights, tmp_path / "out", tiny_model_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tiny_weights)
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert torch.equal(f.get_tensor(name), tiny_weights[name])
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_sharded_write_has_an_index_and_reads_back(tiny_model_dir, tiny_weights, tmp_path) -> None:
    out = save_hf(tiny_weights, tmp_path / "out", tiny_model_dir, shard_size_mb=1)  # 1.4 MB of weights
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tiny_weights.values())
    assert not (out / "model.safetensors").exists()
    read = _read_all(out)
    assert sorted(read) == sorted(tiny_weights) and all(torch.equal(read[n], tiny_weights[n]) for n in read)


def test_config_dtype_follows_the_weights_written(tiny_model_dir, tiny_weights, tmp_path) -> None:
    out = save_hf({n: t.to(torch.bfloat16) for n, t in tiny_weights.items()}, tmp_path / "out", tiny_model_dir)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _read_all(out).values())


def test_reads_a_directory_sharded_by_transformers(tiny_model_dir, tiny_weights, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "hf", max_shard_size="300KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    read = _read_all(tmp_path / "hf")
    assert sorted(read) == sorted(tiny_weights)
    assert all(torch.equal(read[n], tiny_weights[n]) for n in read)


def test_flat_weights_round_trip(tiny_model_dir, tiny_weights, tmp_path) -> None:
    flat = load_flat(tiny_model_dir, version=3)
    assert flat.version == 3 and flat.names() == list(tiny_weights)
    assert all(torch.equal(t, tiny_weights[n]) for n, t in flat.tensors())
    reference = flatten(tiny_weights.items())
    assert [(s.name, s.offset) for s in flat.specs] == [(s.name, s.offset) for s in reference.specs]
    save_hf(flat, tmp_path / "out", tiny_model_dir)
    assert np.array_equal(load_flat(tmp_path / "out").buffer, flat.buffer)


def test_pickle_only_directories_are_refused(tiny_model_dir, tmp_path) -> None:
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(\*\.bin\); we never unpickle"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{"), "config.json is unreadable"),
        (lambda d: (d / "model.safetensors").unlink(), r"no \*\.safetensors weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 16), "bad header length"),
        (lambda d: _truncate(d / "model.safetensors"), "do not fit"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}'),
            "missing",
        ),
    ],
)
def test_damaged_directories_are_refused(tiny_model_dir, tiny_weights, tmp_path, damage, match) -> None:
    target = save_hf(tiny_weights, tmp_path / "model", tiny_model_dir)
    damage(target)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(target)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])


def test_missing_and_non_directories_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint(tmp_path / "file")


def test_an_exception_mid_write_leaves_nothing(tiny_model_dir, tiny_weights, tmp_path) -> None:
    layout = {n: ("float32", tuple(t.shape)) for n, t in tiny_weights.items()}
    with pytest.raises(RuntimeError, match="injected"), CheckpointWriter(tmp_path / "out", layout, tiny_model_dir) as w:
        for i, (name, t) in enumerate(tiny_weights.items()):
            if i == 5:
                raise RuntimeError("injected")
            w.write(name, t)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_incomplete_or_misordered_writes_leave_nothing(tiny_model_dir, tiny_weights, tmp_path) -> None:
    layout = {n: ("float32", tuple(t.shape)) for n, t in tiny_weights.items()}
    with (
        pytest.raises(CheckpointError, match="only 1 of 20 tensors"),
        CheckpointWriter(tmp_path / "out", layout, tiny_model_dir) as w,
    ):
        name = next(iter(tiny_weights))
        w.write(name, tiny_weights[name])
    names = list(tiny_weights)
    with (
        pytest.raises(CheckpointError, match="comes next"),
        CheckpointWriter(tmp_path / "out", layout, tiny_model_dir) as w,
    ):
        w.write(names[1], tiny_weights[names[1]])
    with (
        pytest.raises(ValueError, match="does not match"),
        CheckpointWriter(tmp_path / "out", layout, tiny_model_dir) as w,
    ):
        w.write(names[0], tiny_weights[names[0]].double())
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_outputs_are_refused_unless_overwriting(tiny_model_dir, tiny_weights, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        save_hf(tiny_weights, tmp_path / "out", tiny_model_dir)
    save_hf(tiny_weights, tmp_path / "out", tiny_model_dir, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file() and _leftovers(tmp_path) == []


def test_saving_weights_of_another_architecture_is_refused(tiny_model_dir, tiny_weights, tmp_path) -> None:
    wrong = {**tiny_weights, "model.norm.weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match="'model.norm.weight' has shape"):
        save_hf(wrong, tmp_path / "out", tiny_model_dir)
    with pytest.raises(CheckpointError, match="'lm_head.weight' is not in"):
        save_hf({**tiny_weights, "lm_head.weight": torch.ones(2)}, tmp_path / "out", tiny_model_dir)
    assert not (tmp_path / "out").exists()


def test_checkpoint_state_reads_each_tensor_when_asked_and_closes_its_files(tiny_model_dir) -> None:
    """How learners and engines take θ_init from its directory: a tensor at a time, no descriptor left open."""
    import gc
    import os

    from merger.checkpoint import CheckpointState

    flat = dict(load_flat(tiny_model_dir).tensors())
    open_before = len(os.listdir("/proc/self/fd"))
    state = CheckpointState(tiny_model_dir)
    assert list(state) == list(flat) and len(state) == len(flat)
    assert [(s.name, s.dtype, s.shape) for s in state.specs] == [
        (n, str(t.dtype)[6:], tuple(t.shape)) for n, t in flat.items()
    ]
    for name, tensor in state.tensors():
        assert torch.equal(tensor, flat[name])
    del state
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == open_before
