"""Importing actors stays light: no vllm, ray, torch or deepspeed until a name that needs them is used."""

from __future__ import annotations

import subprocess
import sys


def test_import_actors_is_light():
    code = (
        "import sys, actors, actors.rollout, actors.engine, actors.pool, actors.rewards, actors.transport\n"
        "import actors.worker_extension\n"
        "print(sorted(m for m in ('vllm', 'ray', 'torch', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
