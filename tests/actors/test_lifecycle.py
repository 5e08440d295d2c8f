"""Repeated engine start/shutdown leaves no shared memory behind and the process table as it was.

Other tests may run beside this one (pytest-xdist): a segment counts as left behind when it was created
during the test and no live process has it open or mapped (tests.processes.unheld_shm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.processes import left_over, unheld_shm

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


def _run_cycles(model_dir: Path, cycles: int, multiprocessing: bool, marker: str) -> dict:
    mode = "1" if multiprocessing else "0"
    out = subprocess.run(
        [sys.executable, "-m", "tests.actors.engine_cycle", str(model_dir), str(cycles), mode],
        cwd=ROOT,
        env={**os.environ, "WARP_TEST_MARKER": marker},
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
    started = time.time()
    # Every process the cycle starts inherits the marker, so one that outlived it is found even after its parent
    # exited and it was re-parented; other tests' processes (pytest-xdist runs some beside this one) are not.
    marker = f"warp-lifecycle-{uuid.uuid4().hex}"
    # Restarting in one process is checked in-process; a multiprocess cycle costs a vLLM import in its child.
    cycles = 1 if multiprocessing else 2
    report = _run_cycles(tiny_model_dir, cycles=cycles, multiprocessing=multiprocessing, marker=marker)
    assert report["greedy_is_the_loaded_model"] == [True] * cycles
    if multiprocessing:  # the engine core is a child process while it runs: the check below bites
        assert all(len(state["children"]) > len(report["before"]["children"]) for state in report["during"])
    for state in report["after"]:
        # Python's multiprocessing resource tracker, started once per process, may stay: nothing else.
        assert [name for _, name in state["children"] if name != "python"] == []
        assert state["shm"] == [], state["shm"]
    assert all(state["children"] == report["after"][0]["children"] for state in report["after"])
    assert unheld_shm(since=started) == []
    assert left_over(marker) == {}


def test_only_segments_no_process_holds_count_as_left_behind(tmp_path: Path) -> None:
    started = time.time()
    (tmp_path / "leaked").write_bytes(b"x")
    with open(tmp_path / "in-use", "wb") as held:  # another test's live segment
        held.write(b"x")
        held.flush()
        assert unheld_shm(since=started, root=tmp_path) == ["leaked"]
    assert unheld_shm(since=started, root=tmp_path) == ["in-use", "leaked"]
    assert unheld_shm(since=time.time() + 60, root=tmp_path) == []  # older than the test: not its doing
