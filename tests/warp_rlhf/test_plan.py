"""Placement model and `warp-rlhf plan`: group shapes, first-fit assignment, memory estimates, the CLI. No Ray."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from warp_rlhf.config import Config, load_config
from warp_rlhf.model_size import ModelShape, params_from_config, policy_shape, read_model_shape
from warp_rlhf.models import ModelError
from warp_rlhf.placement import (
    NODE_MARK,
    ClusterFileError,
    Node,
    PlacementError,
    assign,
    group_specs,
    local_node,
    nodes_from_cluster_yaml,
    nodes_from_ray,
)
from warp_rlhf.plan import (
    GIB,
    activation_bytes,
    engine_estimate,
    format_plan,
    learner_estimate,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]
GPU_7B = ROOT / "configs" / "gpu-7b.yaml"
CLUSTER = ROOT / "cluster.yaml"
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def gpu_7b(*overrides: str) -> Config:
    return load_config(GPU_7B, list(overrides))


def cluster_variant(tmp_path: Path, **workers: int) -> Path:
    """cluster.yaml with other worker counts, e.g. learner=1."""
    values = yaml.safe_load(CLUSTER.read_text())
    for node_type, count in workers.items():
        values["available_node_types"][node_type].update(min_workers=count, max_workers=count)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def shape(params: float) -> ModelShape:
    return ModelShape(params, hidden=4096, layers=32, intermediate=14336, vocab=32000,
                      dtype="bfloat16", source="test")  # fmt: skip


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warp_rlhf", "plan", *args], capture_output=True, text=True, cwd=ROOT)


# --- groups and assignment -----------------------------------------------------------------------------------


def test_group_specs_of_the_gpu_preset() -> None:
    specs = group_specs(gpu_7b(), nodes_from_cluster_yaml(CLUSTER))
    assert [s.name for s in specs] == [
        "run-1/learner", "run-2/learner", "run-1/engine-1", "run-1/engine-2", "run-2/engine-1", "run-2/engine-2",
        "reward", "merger",
    ]  # fmt: skip
    learner, engine, reward, merger = specs[0], specs[2], specs[6], specs[7]
    assert (learner.role, learner.run, learner.strategy) == ("learner", 1, "STRICT_PACK")
    assert learner.bundles == ({"CPU": 4, "GPU": 1, "learner_node": NODE_MARK},) * 8
    assert (engine.role, engine.run, engine.strategy) == ("engine", 1, "STRICT_PACK")
    assert engine.bundles == ({"CPU": 2, "GPU": 1, "rollout_node": NODE_MARK},) * 2  # 4 CPUs over TP 2
    assert (reward.run, reward.bundles) == (0, ({"CPU": 2, "GPU": 1, "rollout_node": NODE_MARK},))
    assert (merger.run, merger.bundles) == (0, ({"CPU": 1},))


def test_group_specs_on_cpu_and_without_node_marks() -> None:
    cfg = gpu_7b("actors.num_gpus=0", "learners.num_gpus=0", "reward.remote=false",
                 "resources.learner_resource=", "resources.rollout_resource=")  # fmt: skip
    specs = group_specs(cfg, [Node("n", "node", {"CPU": 64}, None, None)])
    assert specs[0].bundles == ({"CPU": 4},) * 8  # no GPU key when num_gpus = 0
    assert specs[2].bundles == ({"CPU": 4},)  # a CPU engine is one worker whatever tensor_parallel_size says
    assert "reward" not in [s.name for s in specs]


def test_learner_strategy_is_pack_only_when_no_node_holds_it() -> None:
    nodes = nodes_from_cluster_yaml(CLUSTER)
    assert group_specs(gpu_7b("learners.ranks=8"), nodes)[0].strategy == "STRICT_PACK"
    assert group_specs(gpu_7b("learners.ranks=9"), nodes)[0].strategy == "PACK"


def test_gpu_preset_fits_the_shipped_cluster() -> None:
    nodes = nodes_from_cluster_yaml(CLUSTER)
    types = {n.name: n.node_type for n in nodes}
    placement = assign(gpu_7b(), nodes)
    learners = [set(placement[f"run-{m}/learner"]) for m in (1, 2)]
    assert all(len(nodes) == 1 for nodes in learners) and learners[0] != learners[1]  # one node each, apart
    assert {types[n] for nodes in learners for n in nodes} == {"learner"}
    for name in (f"run-{m}/engine-{k}" for m in (1, 2) for k in (1, 2)):
        assert len(placement[name]) == 2 and len(set(placement[name])) == 1  # TP workers on one node
        assert types[placement[name][0]] == "rollout"
    assert types[placement["reward"][0]] == "rollout"
    assert placement["merger"] == ["head-0"]


def test_one_learner_node_is_too_few_for_two_runs(tmp_path: Path) -> None:
    nodes = nodes_from_cluster_yaml(cluster_variant(tmp_path, learner=1))
    with pytest.raises(PlacementError) as err:
        assign(gpu_7b(), nodes)
    message = str(err.value)
    assert message.startswith("run-2/learner needs 8 bundles of {CPU: 4, GPU: 1, learner_node: 0.001} on one node")
    assert "no learner node has 8 GPUs free (learner-0 has 0 of 8 GPUs left after run-1/learner)" in message


def test_a_learner_larger_than_any_node_spreads_over_several() -> None:
    nodes = nodes_from_cluster_yaml(CLUSTER)
    cfg = gpu_7b("learners.ranks=16", "warp.runs=1")
    assert group_specs(cfg, nodes)[0].strategy == "PACK"
    assert assign(cfg, nodes)["run-1/learner"] == ["learner-0"] * 8 + ["learner-1"] * 8
    with pytest.raises(PlacementError, match=r"run-1/learner needs 24 bundles .* room for only 16"):
        assign(gpu_7b("learners.ranks=24", "warp.runs=1"), nodes)


def test_a_node_mark_no_node_has_is_named() -> None:
    with pytest.raises(PlacementError, match="no node has the custom resource 'big_gpu'"):
        assign(gpu_7b("resources.learner_resource=big_gpu"), nodes_from_cluster_yaml(CLUSTER))


def test_assign_places_only_the_given_specs() -> None:
    nodes = nodes_from_cluster_yaml(CLUSTER)
    specs = [s for s in group_specs(gpu_7b(), nodes) if s.role == "engine"]
    assert set(assign(gpu_7b(), nodes, specs)) == {s.name for s in specs}


# --- nodes -----------------------------------------------------------------------------------------------------


def test_nodes_from_cluster_yaml_counts_and_sizes() -> None:
    nodes = nodes_from_cluster_yaml(CLUSTER)
    assert [n.name for n in nodes] == ["head-0", "learner-0", "learner-1", "rollout-0", "rollout-1", "rollout-2"]
    head, learner, rollout = nodes[0], nodes[1], nodes[3]
    assert head.resources["GPU"] == 0 and head.memory_gib == 128 and head.gpu_memory_gib is None
    assert learner.resources == {"CPU": 96, "GPU": 8, "learner_node": 1} and learner.gpu_memory_gib > 78
    assert rollout.resources == {"CPU": 48, "GPU": 4, "rollout_node": 1} and 44 < rollout.gpu_memory_gib < 48


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "does not exist"), ("a: [1, 2", "is not valid YAML"), ("cluster_name: x\n", "no available_node_types")],
)
def test_bad_cluster_files_are_named(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "cluster.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClusterFileError, match=fragment):
        nodes_from_cluster_yaml(path)
    assert issubclass(ClusterFileError, ValueError)


def test_nodes_from_ray_keeps_alive_nodes() -> None:
    def raw(ip: str, node_id: str, alive: bool, **resources: float) -> dict:
        return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "Resources": resources}

    listed = [
        raw("10.0.0.1", "aa" * 28, True, **{"CPU": 32, "memory": 80 * GIB, "object_store_memory": 20 * GIB,
                                             "node:10.0.0.1": 1, "node:__internal_head__": 1}),
        raw("10.0.0.2", "bb" * 28, True, CPU=96, GPU=8, learner_node=1, **{"accelerator_type:A100": 1}),
        raw("10.0.0.3", "cc" * 28, True, CPU=48, GPU=4, rollout_node=1, **{"accelerator_type:L40S": 1}),
        raw("10.0.0.4", "dd" * 28, False, CPU=48, GPU=4, rollout_node=1),
        raw("10.0.0.5", "ee" * 28, True, CPU=8),
        raw("10.0.0.5", "ff" * 28, True, CPU=8),
    ]  # fmt: skip
    nodes = nodes_from_ray(listed)
    assert [n.name for n in nodes] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5/eeeeeeee", "10.0.0.5/ffffffff"]
    assert [n.node_type for n in nodes] == ["head", "learner", "rollout", "node", "node"]
    assert nodes[0].memory_gib == pytest.approx(100) and nodes[1].memory_gib is None
    assert nodes[1].gpu_memory_gib is None and nodes[2].gpu_memory_gib == pytest.approx(44.4)  # A100: 40 or 80 GB
    assert nodes[1].ip == "10.0.0.2" and nodes[1].resources["learner_node"] == 1


def test_local_node_is_sized_like_the_drivers_local_cluster() -> None:
    node = local_node(gpu_7b())
    assert node.resources["CPU"] >= 2 * (8 * 4 + 2 * 4) + 2 + 1  # logical CPUs sized to the run
    assert node.resources["learner_node"] == node.resources["rollout_node"] == 1
    assert "GPU" not in node.resources and (node.memory_gib is None or node.memory_gib > 0)


# --- model sizes and memory estimates ------------------------------------------------------------------------


def test_parameter_counts_from_config_match_the_published_ones() -> None:
    assert params_from_config(MISTRAL_7B) == 7_241_732_096
    llama2 = dict(MISTRAL_7B, intermediate_size=11008, num_key_value_heads=32)
    assert params_from_config(llama2) == 6_738_415_616
    gemma = dict(MISTRAL_7B, hidden_size=3072, intermediate_size=24576, num_attention_heads=16, head_dim=256,
                 num_key_value_heads=16, num_hidden_layers=28, vocab_size=256000, tie_word_embeddings=True)  # fmt: skip
    assert params_from_config(gemma) == 8_537_680_896


def test_parameter_count_comes_from_safetensors_headers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [5], "data_offsets": [24, 34]}}  # fmt: skip
    encoded = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(34))
    got = read_model_shape(tmp_path)
    assert got.params == 17 and (got.hidden, got.layers, got.intermediate) == (4096, 32, 14336)
    assert read_model_shape(tmp_path, params=7e9).params == 7e9


def test_learner_memory_zero3_by_hand() -> None:
    """7e9 parameters, bf16, ZeRO-3 over 8 ranks: 16 bytes/param of states and 6 of anchor, each split 8 ways."""
    got = dict(learner_estimate(gpu_7b(), shape(7e9)).gpu)
    expected = {"weights": 1.75e9, "grads": 1.75e9, "fp32 master weights": 3.5e9, "Adam moments": 7e9,
                "EMA anchor": 5.25e9}  # fmt: skip
    for item, nbytes in expected.items():
        assert got[item] == pytest.approx(nbytes / GIB), item
    assert sum(got[k] for k in expected) == pytest.approx(19.25e9 / GIB)


@pytest.mark.parametrize(
    ("stage", "split"),  # which of weights, grads, master + Adam, anchor ZeRO partitions over the 8 ranks
    [(0, (1, 1, 1, 1)), (1, (1, 1, 8, 1)), (2, (1, 8, 8, 1)), (3, (8, 8, 8, 8))],
)
def test_zero_stages_partition_in_order(stage: int, split: tuple[int, ...]) -> None:
    got = dict(learner_estimate(gpu_7b(f"learners.zero_stage={stage}"), shape(7e9)).gpu)
    full = (14e9, 14e9, 12 * 7e9, 6 * 7e9)
    have = (got["weights"], got["grads"], got["fp32 master weights"] + got["Adam moments"], got["EMA anchor"])
    assert have == pytest.approx(tuple(f / s / GIB for f, s in zip(full, split, strict=True)))


def test_anchor_on_cpu_and_float32() -> None:
    # anchor_on_cpu is for ZeRO 0-2 (the ZeRO-3 anchor is partitioned instead): a full anchor in host RAM.
    on_cpu = learner_estimate(gpu_7b("learners.zero_stage=2", "learners.anchor_on_cpu=true"), shape(7e9))
    assert "EMA anchor" not in dict(on_cpu.gpu) and dict(on_cpu.host)["EMA anchor"] == pytest.approx(42e9 / GIB)
    fp32 = dict(learner_estimate(gpu_7b("model.dtype=float32", "learners.zero_stage=0"), shape(7e9)).gpu)
    assert "fp32 master weights" not in fp32 and fp32["EMA anchor"] == pytest.approx(28e9 / GIB)  # no bf16 copy


def test_activations_by_hand() -> None:
    tiny = ModelShape(100, hidden=4, layers=2, intermediate=8, vocab=10, dtype="", source="")
    per_layer = 2 * (7 * 4 + 4 * 8) + 8 * 4  # bf16 saved tensors + fp32 RMSNorm inputs, per token
    assert activation_bytes(tiny, 16, 8, 2) == 16 * 2 * per_layer + 16 * 10 * 2 + 8 * 10 * (2 + 12)


def test_engine_memory_by_hand() -> None:
    got = dict(engine_estimate(gpu_7b(), shape(7e9)).gpu)
    assert got["weights / TP"] == pytest.approx(7e9 / GIB) and got["KV cache"] == 20


def test_the_shipped_preset_fits_in_memory_for_a_7b_model() -> None:
    result = plan(gpu_7b(), nodes_from_cluster_yaml(CLUSTER), replace(shape(0), params=params_from_config(MISTRAL_7B)))
    assert result.fits, result.failures
    learner = next(u for u in result.usage if u.node_type == "learner")
    assert 60 < max(learner.gpu_gib) < learner.gpu_capacity_gib  # ~71 GiB of 79: the activations dominate


def test_a_learner_gpu_over_capacity_is_named() -> None:
    result = plan(gpu_7b("learners.micro_batch_size=16"), nodes_from_cluster_yaml(CLUSTER), shape(7.24e9))
    assert not result.fits
    assert result.failures[0].startswith("learner node learner-0: GPU 0 (run-1/learner rank 0) needs ")
    assert "more than its 79.1 GiB" in result.failures[0]
    assert "Does not fit" in format_plan(result)


def test_missing_model_needs_params_and_a_bad_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="pass --params N"):
        policy_shape(gpu_7b())
    assert policy_shape(gpu_7b(), params=7e9).params == 7e9
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(ModelError, match="not a Llama-style decoder config"):
        policy_shape(gpu_7b(), model_config=tmp_path / "config.json")


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_plans_the_gpu_preset() -> None:
    result = plan_cli("--config", str(GPU_7B), "--cluster", str(CLUSTER), "--params", "7.24e9")
    assert result.returncode == 0, result.stderr
    assert "run-2/learner   ranks 0-7       learner-1" in result.stdout
    assert "Fits:" in result.stdout and result.stderr == ""


SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_demo_fits_a_24_gib_machine_in_either_dtype(tmp_path: Path, dtype: str) -> None:
    """model.dtype auto picks float32 on CPUs without native bf16: the demo must fit there too (it once did not)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMOLLM2_135M))
    result = plan_cli("--config", "configs/demo.yaml", "--params", "134515008", "--model-config", str(config),
                      f"model.dtype={dtype}", f"model.path={tmp_path}/absent")  # fmt: skip
    assert "local  1      -            " in result.stdout, result.stdout
    needed = float(result.stdout.split("local  1      -            ")[1].split()[0])
    assert needed <= 22.0, result.stdout  # a 24 GiB machine, less what the OS and the driver keep


def test_cli_exits_2_naming_what_does_not_fit(tmp_path: Path) -> None:
    one = cluster_variant(tmp_path, learner=1)
    result = plan_cli("--config", str(GPU_7B), "--cluster", str(one), "--params", "7.24e9")
    assert result.returncode == 2
    assert "Does not fit" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("warp-rlhf: error: the run does not fit: run-2/learner needs 8 bundles")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--cluster", "missing.yaml", "--params", "7e9"], "cluster file 'missing.yaml' does not exist"),
        (["--cluster", "cluster.yaml"], "model '/models/sft-7b' is not on this machine: pass --params N"),
        (["--params", "seven"], "argument --params: expected a number"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], fragment: str) -> None:
    result = plan_cli("--config", str(GPU_7B), *args)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr
