"""Finding the processes a test started, through a marker in their environment (every child inherits it)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def processes_with(marker: str) -> dict[int, str]:
    """pid → command line (its first 120 characters) of every process whose environment holds ``marker``."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
                found[int(proc.name)] = command.strip()
        except OSError:  # exited meanwhile, or not ours to read
            continue
    found.pop(os.getpid(), None)
    return found


def left_over(marker: str, grace_s: float = 15.0) -> dict[int, str]:
    """The marked processes still alive after ``grace_s`` seconds (an empty dict once all are gone)."""
    deadline = time.monotonic() + grace_s
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
