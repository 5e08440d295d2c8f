"""A LoRA adapter as it travels from a learner to the engines, and as it is saved: the wire contract.

:class:`AdapterWeights` is one run's adapter after a step: its factors as FlatWeights under the names
peft saves them with (``base_model.model.<module>.lora_A.weight`` (r, in), ``….lora_B.weight`` (out, r)),
plus r, α and the target modules. It is megabytes where the model is hundreds of them, so it always
travels through the object store, whatever ``actors.weight_transport`` says. :func:`save_adapter`
writes peft's directory format (``adapter_model.safetensors`` + ``adapter_config.json``), which vLLM's
LoRA loader, ``peft`` and ``vllm serve --lora-modules`` read. Imports numpy and json; torch and
safetensors lazily; never vllm or deepspeed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from merger.flat import FlatWeights

# vLLM allocates adapter slots of one of these ranks (vllm.config.lora.MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class AdapterWeights:
    weights: FlatWeights
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def version(self) -> int:
        return self.weights.version

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def config(self, base_model: str) -> dict:
        """peft's adapter_config.json for these factors (the keys peft and vLLM read)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.rank, "lora_alpha": self.alpha, "target_modules": list(self.target_modules),
                "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "use_dora": False, "modules_to_save": None, "init_lora_weights": True}  # fmt: skip


def vllm_max_rank(rank: int) -> int:
    """The smallest adapter slot rank vLLM offers that holds rank ``rank``."""
    for slot in VLLM_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank}: vLLM serves adapters up to rank {VLLM_RANKS[-1]}")


def save_adapter(adapter: AdapterWeights, directory: str | Path, base_model: str) -> Path:
    """Write ``directory`` as a peft adapter of ``base_model``: complete, or not at all (renamed into place)."""
    from safetensors.torch import save_file

    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: t.contiguous() for name, t in adapter.weights.tensors()}
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(adapter.config(base_model), indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
