"""How big a run's models are, without loading them: parameter count and layer shape.

Owns :class:`ModelShape` and the ways to get one: an HF directory (parameters summed from the safetensors
headers, shapes from config.json), a config.json alone (parameters computed for Llama-, Mistral-, Qwen- and
Gemma-style decoders), or a bare parameter count (a Mistral-proportioned shape, flagged as a guess); and
which directory holds the policy (an alias only once it is built) and the HF reward model. Reads a few
kilobytes per file. Imports the standard library and the config only: never torch, transformers,
safetensors or Ray.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from warp_rlhf.config import Config
from warp_rlhf.models import ALIASES, ModelError, cache_root

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a decoder-only transformer."""

    params: float
    """Parameter count (tied embeddings counted once)."""
    hidden: int
    """Width of the residual stream."""
    layers: int
    """Decoder layers."""
    intermediate: int
    """Width of the gated MLP."""
    vocab: int
    """Vocabulary size (the logits' width)."""
    dtype: str
    """Dtype the checkpoint is stored in (config.json), float32 when it does not say."""
    source: str
    """Where the numbers come from, for the report."""

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest weight tensor: the embedding or one MLP projection."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def _text_config(values: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's shape in text_config."""
    text = values.get("text_config")
    return text if "hidden_size" not in values and isinstance(text, dict) else values


def _classifier_labels(values: dict[str, Any]) -> int:
    """Labels of a sequence classifier (a reward model's head); 0 for a language model."""
    if any(str(a).endswith("ForSequenceClassification") for a in values.get("architectures") or ()):
        return int(values.get("num_labels") or len(values.get("id2label") or {}) or 2)
    return 0


def params_from_config(values: dict[str, Any]) -> int:
    """Parameters of a Llama-style decoder: embeddings, attention (GQA), gated MLP, RMSNorms, untied head."""
    c = _text_config(values)
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    q, kv = heads * head_dim, c.get("num_key_value_heads", heads) * head_dim
    attention = h * q + 2 * h * kv + q * h
    if c.get("attention_bias") or str(c.get("model_type", "")).startswith("qwen2"):  # Qwen2 always has q/k/v biases
        attention += q + 2 * kv
    per_layer = attention + 3 * h * inter + 2 * h
    labels = _classifier_labels(values)
    tied = values.get("tie_word_embeddings", c.get("tie_word_embeddings", True))  # HF's default is tied
    head = h * labels if labels else (0 if tied else h * vocab)
    return vocab * h + layers * per_layer + h + head


def shape_from_config(values: dict[str, Any], params: float | None = None, source: str = "config.json") -> ModelShape:
    """The shape in ``values`` (a parsed config.json); ``params`` when given, else computed from the shape."""
    c = _text_config(values)
    try:
        return ModelShape(
            params=float(params if params is not None else params_from_config(values)),
            hidden=int(c["hidden_size"]),
            layers=int(c["num_hidden_layers"]),
            intermediate=int(c["intermediate_size"]),
            vocab=int(c["vocab_size"]),
            dtype=str(values.get("dtype") or values.get("torch_dtype") or "float32"),
            source=source,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelError(f"{source}: not a Llama-style decoder config (missing or bad {exc})") from None


def guessed_shape(params: float) -> ModelShape:
    """A Mistral/Llama-3-proportioned shape for ``params`` parameters: width 128 × layers, MLP 3.5 × width,
    K and V a quarter of the width, vocabulary 32000, so 13·L·h² ≈ params. Only the activation estimate uses it.
    """
    hidden = max(128, round((128 * params / 13) ** (1 / 3) / 128) * 128)
    return ModelShape(
        params=float(params),
        hidden=hidden,
        layers=hidden // 128,
        intermediate=round(3.5 * hidden / 128) * 128,
        vocab=32000,
        dtype="",
        source="--params; layer shape guessed from Mistral proportions: --model-config gives the model's own",
    )


def safetensors_params(directory: Path) -> int | None:
    """Sum of tensor sizes in the headers of ``directory``'s *.safetensors files; None when there are none."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as exc:
            raise ModelError(f"{file}: unreadable safetensors header ({exc})") from None
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def read_model_shape(path: Path, params: float | None = None) -> ModelShape:
    """An HF directory (config.json + safetensors headers) or a config.json file; ``params`` overrides the count."""
    config = path / "config.json" if path.is_dir() else path
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model config {str(config)!r} is unreadable ({exc})") from None
    if not isinstance(values, dict):
        raise ModelError(f"model config {str(config)!r} is not a JSON object")
    shape = shape_from_config(values, None, str(config))
    counted = safetensors_params(path) if path.is_dir() else None
    if params is not None:
        return replace(shape, params=float(params), source=f"--params, shape from {config}")
    if counted is not None:
        return replace(shape, params=float(counted), source=f"{path} (safetensors headers)")
    return shape


# ---------------------------------------------------------------------------------------------------
# The run's models


def policy_shape(cfg: Config, params: float | None = None, model_config: str | Path | None = None) -> ModelShape:
    """The policy's shape from --model-config, else the model directory, else --params alone (a guessed shape)."""
    if model_config is not None:
        path = Path(model_config)
        if not path.exists():
            raise ModelError(f"--model-config {str(path)!r} does not exist")
        return read_model_shape(path, params)
    path = Path(cfg.model.path).expanduser()
    if cfg.model.path in ALIASES:  # where resolve_model builds an alias; converting one here would take minutes
        path = cache_root() / "models" / f"{cfg.model.path}-{cfg.model.dtype}"
    if (path / "config.json").is_file():
        return read_model_shape(path, params)
    if params is not None:
        return guessed_shape(params)
    where = "is not built yet (`warp-rlhf train` builds it)" if cfg.model.path in ALIASES else "is not on this machine"
    raise ModelError(
        f"model {cfg.model.path!r} {where}: pass --params N (e.g. --params 7.24e9) or --model-config FILE "
        "(its config.json)"
    )


def reward_shape(cfg: Config) -> ModelShape | None:
    """The HF reward model's shape when its directory is on this machine; None otherwise."""
    path = Path(cfg.reward.path).expanduser()
    return read_model_shape(path) if cfg.reward.kind == "hf" and (path / "config.json").is_file() else None
