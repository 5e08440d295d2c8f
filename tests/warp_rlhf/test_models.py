"""Model resolution: local directories, packaged aliases converted once and atomically, clear errors."""

from pathlib import Path

import pytest

from warp_rlhf.models import ModelError, materialise, parsed_once, resolve_model

# SHA-256 over (name, dtype, bytes) of every tensor of the bf16 SmolLM2 conversion, sorted by name, taken from
# the conversion before parsed_once() shared transformers' GGUF parses. A different digest means the demo's
# model changed (a transformers or gguf upgrade, a wrong Q/K permutation): nothing else would notice.
SMOLLM2_BF16_DIGEST = "03a334a37f4ff42380b258302e1ff3298ea461215a18e8fcc27ecdd74b9c80d2"


def weights_digest(path: Path) -> str:
    import hashlib

    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(path / "model.safetensors", "pt") as weights:
        for name in sorted(weights.keys()):
            tensor = weights.get_tensor(name)
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_tiny_model_loads_in_transformers(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.tie_word_embeddings
    assert tokenizer.eos_token_id == model.config.eos_token_id == 0
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "has no config.json"),
        ({"config.json": "{"}, "config.json is unreadable"),
        ({"config.json": "{}", "pytorch_model.bin": ""}, "only pickle weights"),
        ({"config.json": "{}"}, r"no \*\.safetensors weights"),
    ],
)
def test_bad_model_directories_are_refused(tmp_path: Path, files: dict[str, str], fragment: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelError, match=fragment):
        resolve_model(str(tmp_path))


def test_missing_model_names_the_aliases(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist.*smollm2-135m"):
        resolve_model(str(tmp_path / "nowhere"))


def test_materialise_is_atomic_and_reused(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def crash(out: Path) -> None:
        (out / "half.safetensors").write_text("partial")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        materialise(target, crash)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    calls = []
    materialise(target, lambda out: calls.append((out / "config.json").write_text("{}")))
    materialise(target, lambda out: calls.append("again"))
    assert len(calls) == 1 and (target / "config.json").is_file()


@pytest.mark.vllm
def test_smollm2_alias_loads_in_transformers_and_vllm() -> None:
    import json

    path = resolve_model("smollm2-135m")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model("smollm2-135m") == path  # cached, not converted again
    assert weights_digest(path) == SMOLLM2_BF16_DIGEST

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 49152
    assert tokenizer("The film opens on a quiet street at dawn.")["input_ids"] == [
        504, 4771, 10573, 335, 253, 8354, 7280, 418, 16804, 30
    ]  # fmt: skip

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=256)
    try:
        out = llm.generate(["The movie was"], SamplingParams(max_tokens=4, temperature=0.0))
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_gguf_parses_are_shared_only_inside_parsed_once() -> None:
    import gguf

    unpatched = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with parsed_once():
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == unpatched
    assert gguf.get_tensor_name_map(arch, 2) is not gguf.get_tensor_name_map(arch, 2)
