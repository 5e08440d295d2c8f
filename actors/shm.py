"""Directories a LoRA engine writes its adapters into, under /dev/shm, named after the engine's pid.

An engine removes its directory when it shuts down, but a SIGKILLed engine (a second Ctrl-C, the OOM
killer, a crashed node) cannot: its directory would stay in memory until reboot. The pid in the name lets
whoever survives remove it: ``train`` after it SIGKILLs its process tree, and any LoRA engine that starts
later on the machine (the directories of engines no longer alive). Standard library only, so the driver's
signal handler can import it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

PREFIX = "warp-lora-"


def shm_root() -> str | None:
    """Where engines put files vLLM's processes read (adapters, weights in multiprocess mode): memory, if any."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def prefix_for(pid: int) -> str:
    """``tempfile.mkdtemp(prefix=...)`` for an engine process: ``warp-lora-<pid>-<random>``."""
    return f"{PREFIX}{pid}-"


def owner(path: Path) -> int | None:
    """The pid in an adapter directory's name, or None for anything else."""
    pid, sep, _ = path.name.removeprefix(PREFIX).partition("-")
    return int(pid) if path.name.startswith(PREFIX) and sep and pid.isdigit() else None


def remove_adapter_dirs(pids: Iterable[int], root: str | None = None) -> list[Path]:
    """Remove the adapter directories of the engines ``pids`` (just killed); returns what was removed."""
    pids, base = set(pids), root or shm_root()
    if not pids or base is None:
        return []
    removed = [path for path in Path(base).glob(f"{PREFIX}*") if owner(path) in pids]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_orphaned_adapter_dirs(root: str | None = None) -> list[Path]:
    """Remove the adapter directories of engines that are no longer alive."""
    base = root or shm_root()
    if base is None:
        return []
    dead = {pid for path in Path(base).glob(f"{PREFIX}*") if (pid := owner(path)) is not None and not _alive(pid)}
    return remove_adapter_dirs(dead, base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
