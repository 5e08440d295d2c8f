"""Model resolution: local directories, packaged aliases converted once and atomically, clear errors."""

from pathlib import Path

import pytest

from warp_rlhf.models import ModelError, materialise, resolve_model


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
