"""Session fixtures shared by every test package: tiny random models, a local Ray cluster, markers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never touch the user's cache; CI and repeated runs reuse this one (the Makefile sets it too).
os.environ.setdefault("WARP_RLHF_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
# One vLLM process per engine keeps tests fast (1.9 s start-up instead of 15 s).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    import torch

    return torch.cuda.is_available()


# The modules that take longest (each trains through the CLI or starts a cluster: minutes), longest first.
# `make test` runs two pytest-xdist workers that take whole modules (--dist loadscope) in collection order
# (--no-loadscope-reorder: by default xdist orders modules by test count, which put these last), a couple at a
# time: starting these first keeps one of them from running alone at the end.
LONGEST_FIRST = (
    "tests/warp_rlhf/test_cluster.py",
    "tests/warp_rlhf/test_end_to_end.py",
    "tests/warp_rlhf/test_study.py",
    "tests/warp_rlhf/test_lora_runs.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # only side by side: a serial run keeps its proven order
        rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep theirs
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none found")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random fp32 Llama (tied embeddings) with a real BPE tokenizer, built once and cached."""
    from warp_rlhf.models import resolve_model

    return resolve_model("tiny-llama", dtype="float32")


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny random Llama sequence classifier (one label) with the tiny model's tokenizer: a reward model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("reward-model")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray cluster for the session; shuts down only what it started (never `ray stop`)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        runtime_env={"env_vars": {k: os.environ[k] for k in _RAY_ENV if k in os.environ}},
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


_RAY_ENV = (
    "WARP_RLHF_CACHE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "TOKENIZERS_PARALLELISM",
)
