"""``model.dtype: auto``: bf16 where the hardware computes it natively, fp32 where it would be emulated.

CPUs compute bf16 natively with AVX512-BF16 or AMX; without them PyTorch emulates bf16 matmuls in fp32
plus conversions, about 4x slower than plain fp32 (measured: a demo learner step of 50 s against 12 s).
CUDA devices compute bf16 from Ampere on. The resolved dtype is what learners, engines and checkpoints
use and what the run's ``config.yaml`` records, so a run never mixes the two.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

from warp_rlhf.config import Config

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's first CPU, from /proc/cpuinfo; ("unknown CPU", {}) elsewhere."""
    name, flags = "unknown CPU", frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return name, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


def native_bf16_cpu() -> str | None:
    """The CPU flag that makes bf16 native here, or None when bf16 would be emulated."""
    _, flags = cpu_info()
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def demo_config() -> str:
    """The CPU demo `make demo` trains here: sized for bf16 where this CPU computes it, else the fp32 demo."""
    return "configs/demo.yaml" if native_bf16_cpu() else "configs/demo-fp32.yaml"


def uses_gpus(cfg: Config) -> bool:
    return cfg.learners.num_gpus > 0 or cfg.actors.num_gpus > 0


def best_dtype(cfg: Config) -> tuple[str, str]:
    """(dtype, why) for the hardware the run's learners and engines compute on."""
    if uses_gpus(cfg):
        import torch

        if not torch.cuda.is_available():  # a CPU head node driving GPU workers
            return "bfloat16", ("the run's learners and engines use GPUs (bf16 from Ampere on; "
                                "set model.dtype: float32 for older ones)")  # fmt: skip
        gpu = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"this GPU ({gpu}) computes bf16"
        return "float32", f"this GPU ({gpu}) does not compute bf16"
    name, _ = cpu_info()
    flag = native_bf16_cpu()
    if flag:
        return "bfloat16", f"this CPU ({name}) has {flag}"
    return "float32", f"this CPU ({name}) has neither {' nor '.join(BF16_CPU_FLAGS)}, so bf16 would be emulated"


def resolve_dtype(cfg: Config, recorded: str | None = None) -> tuple[Config, str]:
    """The config with a concrete ``model.dtype``, and why it is that one.

    ``recorded`` is the dtype of the run being resumed: an ``auto`` run keeps it, so a resume on other
    hardware continues the checkpoints it has rather than refusing them.
    """
    if cfg.model.dtype != "auto":
        return cfg, "set in the config"
    if recorded is not None:
        chosen, why = recorded, "the dtype of the run being resumed"
    else:
        chosen, why = best_dtype(cfg)
    return replace(cfg, model=replace(cfg.model, dtype=chosen)), f"auto: {why}"


def emulated_warning(cfg: Config) -> str | None:
    """A warning when the run computes in bf16 on a CPU that only emulates it, else None."""
    if cfg.model.dtype != "bfloat16" or uses_gpus(cfg) or native_bf16_cpu() is not None:
        return None
    return (f"model.dtype = bfloat16 on a CPU without {' or '.join(BF16_CPU_FLAGS)} ({cpu_info()[0]}): bf16 is "
            "emulated here and about 4x slower than float32 (model.dtype: auto picks float32)")  # fmt: skip
