"""Finding the processes a test started, through a marker in their environment (every child inherits it), and
shared memory that no process holds any more."""

from __future__ import annotations

import contextlib
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


def unheld_shm(since: float, root: Path = Path("/dev/shm")) -> list[str]:
    """Entries of ``root`` created at or after ``since`` (a ``time.time()``) that no live process has open or
    mapped: leaked segments. Another test's segments in use (tests run side by side) are held, so not counted."""
    fresh = {}
    for entry in root.iterdir():
        try:
            info = entry.lstat()
        except OSError:  # removed meanwhile
            continue
        if info.st_ctime >= since:
            fresh[str(entry)] = entry.name
    if not fresh:
        return []
    held = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            held |= {line.split(maxsplit=5)[-1] for line in (proc / "maps").read_text().splitlines() if "/" in line}
            fds = list((proc / "fd").iterdir())
        except OSError:  # exited meanwhile, or not ours to read
            continue
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor among them)
                held.add(os.readlink(fd))
    return sorted(name for path, name in fresh.items() if path not in held and Path(path).exists())
