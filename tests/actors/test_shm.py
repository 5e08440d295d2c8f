"""Adapter directories in /dev/shm are named after their engine's pid, so a killed engine's can be removed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from actors import shm


def test_only_the_directories_of_engines_no_longer_alive_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within this test is vanishingly unlikely)
    orphan = Path(tempfile.mkdtemp(prefix=shm.prefix_for(dead_pid), dir=tmp_path))
    (orphan / "run-1").mkdir()
    mine = Path(tempfile.mkdtemp(prefix=shm.prefix_for(os.getpid()), dir=tmp_path))
    unrelated = tmp_path / "warp-lora-old_style"  # no pid in the name: not ours to judge
    unrelated.mkdir()
    assert shm.remove_orphaned_adapter_dirs(str(tmp_path)) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, unrelated.name])


def test_train_removes_the_directories_of_the_engines_it_killed(tmp_path: Path) -> None:
    first = Path(tempfile.mkdtemp(prefix=shm.prefix_for(101), dir=tmp_path))
    other = Path(tempfile.mkdtemp(prefix=shm.prefix_for(1012), dir=tmp_path))  # a pid with 101 as its prefix
    assert shm.remove_adapter_dirs([101], str(tmp_path)) == [first]
    assert [p.name for p in tmp_path.iterdir()] == [other.name]
    assert shm.owner(other) == 1012 and shm.owner(tmp_path / "warp-lora-x") is None
