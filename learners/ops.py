"""Build, once per machine, the DeepSpeed C++ ops a learner process loads, so no rank compiles at start.

The learner uses torch's AdamW (fused kernel, no DeepSpeed op). The one op DeepSpeed JIT-compiles on
CPU is the shared-memory communication op (``deepspeed_shm_comm_op``), which every process builds
or loads when DeepSpeed's communication backend starts, even for gloo. Builds are cached in
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); a cached op loads in well under a second.
On CUDA accelerators there is nothing to build. Imports deepspeed lazily; never Ray or vLLM.
"""

from __future__ import annotations

import time

OPS = ("ShareMemCommBuilder",)  # what deepspeed.comm loads at init on the CPU accelerator


def prebuild() -> dict[str, float]:
    """Build (or load from the cache) every op a learner needs on this accelerator; seconds per op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    timings = {}
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue  # not used on this accelerator
        start = time.perf_counter()
        builder.load(verbose=False)
        timings[builder.NAME] = time.perf_counter() - start
        print(f"deepspeed op {builder.NAME}: ready in {timings[builder.NAME]:.1f} s")
    return timings
