"""Importing our packages must stay cheap: no vllm, deepspeed or ray (nor torch) at package import time."""

import subprocess
import sys

import pytest

HEAVY = ("vllm", "deepspeed", "ray", "torch")


@pytest.mark.parametrize("package", ["actors", "learners", "merger", "warp_rlhf", "warp_rlhf.cli"])
def test_package_import_is_light(package: str) -> None:
    code = f"import sys, {package}; print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing {package} pulled in: {result.stdout.strip()}"


def test_environment_has_no_forbidden_packages() -> None:
    import shutil

    extra = "gpu" if shutil.which("nvidia-smi") else "cpu"
    result = subprocess.run(
        [sys.executable, "install/check_env.py", extra], capture_output=True, text=True, cwd=_root()
    )
    assert result.returncode == 0, result.stderr


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
