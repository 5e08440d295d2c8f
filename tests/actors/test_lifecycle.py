"""Repeated engine start/shutdown leaves /dev/shm and the process table as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


def _run_cycles(model_dir: Path, cycles: int, multiprocessing: bool) -> dict:
    mode = "1" if multiprocessing else "0"
    out = subprocess.run(
        [sys.executable, "-m", "tests.actors.engine_cycle", str(model_dir), str(cycles), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


@pytest.mark.parametrize(
    "multiprocessing",
    [pytest.param(False, id="in-process"), pytest.param(True, marks=pytest.mark.slow, id="multiprocess")],
)
def test_engine_start_shutdown_leaves_nothing(tiny_model_dir, multiprocessing):
    shm_before = set(os.listdir("/dev/shm"))
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    # Restarting in one process is checked in-process; a multiprocess cycle costs a vLLM import in its child.
    cycles = 1 if multiprocessing else 2
    report = _run_cycles(tiny_model_dir, cycles=cycles, multiprocessing=multiprocessing)
    if multiprocessing:  # the engine core is a child process while it runs: the check below bites
        assert all(len(state["children"]) > len(report["before"]["children"]) for state in report["during"])
    for state in report["after"]:
        # Python's multiprocessing resource tracker, started once per process, may stay: nothing else.
        assert [name for _, name in state["children"] if name != "python"] == []
        assert state["shm"] == report["before"]["shm"]
    assert all(state["children"] == report["after"][0]["children"] for state in report["after"])
    assert set(os.listdir("/dev/shm")) == shm_before
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children_before
