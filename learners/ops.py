"""Build, once per machine, the DeepSpeed C++ ops a learner process loads, so no rank compiles at start.

The learner uses torch's AdamW (fused kernel, no DeepSpeed op). The one op DeepSpeed JIT-compiles on
CPU is the shared-memory communication op (``deepspeed_shm_comm_op``), which every process builds
or loads when DeepSpeed's communication backend starts, even for gloo. Builds are cached in
$TORCH_EXTENSIONS_DIR, by default inside the Python environment (``extensions_dir``); a cached op
loads in well under a second. On CUDA accelerators there is nothing to build. Imports deepspeed lazily;
never Ray or vLLM.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

OPS = ("ShareMemCommBuilder",)  # what deepspeed.comm loads at init on the CPU accelerator
EXTENSIONS = ("deepspeed_shm_comm",)  # their torch extension names (build directories)
STALE_AFTER_S = 300.0  # a build takes about a minute on two cores; a lock this old has no owner left


def extensions_dir() -> Path:
    """Where this Python environment's compiled ops live: $TORCH_EXTENSIONS_DIR, else inside the environment.

    A build records the absolute paths of its environment's torch headers and compiler flags, so two
    environments (two clones, each with its .venv) sharing one directory rebuild the op in turn, about 80 s
    each on two cores, in the middle of a learner's start-up. Keeping it beside the environment's packages
    ties it to them; a read-only environment (a system Python) uses the user's cache instead.
    """
    if configured := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(configured)
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path.home() / ".cache" / "warp-rlhf" / "torch_extensions" / python


@contextmanager
def ops_loading() -> Iterator[Path]:
    """The block loads DeepSpeed's ops: from ``extensions_dir()``, with stale build locks removed meanwhile."""
    directory = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(directory)  # torch reads it when it builds or loads
    use_environments_ninja()
    with stale_build_locks_cleared():
        yield directory


def use_environments_ninja() -> None:
    """Put this Python environment's ninja (the ``ninja`` package DeepSpeed depends on) first on PATH.

    torch runs whichever ``ninja`` PATH finds first to decide whether a cached op is up to date, and ninja
    versions record a build's command differently in ``.ninja_log``: a process that finds the system's
    ninja (PATH without the environment's bin directory, as under ``make``) and one that finds the
    environment's (an activated environment, ``ray job submit``, Ray's workers on a cluster) each decided
    that the other's build was stale and rebuilt the op, a minute of two cores inside a learner's start-up,
    twice per test suite. One ninja for every process makes the cached op load instead.
    """
    try:
        import ninja
    except ImportError:  # torch falls back to the system's ninja, as before
        return
    path = os.environ.get("PATH", "")
    if not path.startswith(ninja.BIN_DIR + os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


@contextmanager
def stale_build_locks_cleared(max_age_s: float = STALE_AFTER_S, every_s: float = 5.0) -> Iterator[None]:
    """While the block runs (it loads the ops), remove any of their build locks older than ``max_age_s``.

    torch guards each extension build with a lock file that every loading process waits on, with no
    timeout. A process killed while holding it (Ctrl-C or SIGKILL during the first start-up on a
    machine) leaves it behind, and every later learner would wait forever; a waiting one proceeds as
    soon as the file is gone.
    """
    stop = threading.Event()
    # Found here, not in the thread: an import in a second thread while the first imports DeepSpeed can
    # deadlock on the interpreter's import locks (setuptools' distutils hook imports inside find_spec).
    # It did: a learner hung in init_distributed until it was killed.
    locks = build_locks()

    def watch() -> None:
        while True:
            for lock in locks:
                try:
                    age = time.time() - lock.stat().st_mtime
                except OSError:
                    continue
                if age > max_age_s:
                    log.warning("removing %s: a build lock %.0f s old, left by a process killed mid-build", lock, age)
                    lock.unlink(missing_ok=True)
            if stop.wait(every_s):
                return

    watcher = threading.Thread(target=watch, name="op-build-lock-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()


def build_locks() -> list[Path]:
    from torch.utils.cpp_extension import _get_build_directory

    return [Path(_get_build_directory(name, verbose=False)) / "lock" for name in EXTENSIONS]


def prebuild() -> dict[str, float]:
    """Build (or load from the cache) every op a learner needs on this accelerator; seconds per op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    timings = {}
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue  # not used on this accelerator
        start = time.perf_counter()
        with ops_loading() as directory:
            builder.load(verbose=False)
        timings[builder.NAME] = time.perf_counter() - start
        print(f"deepspeed op {builder.NAME}: ready in {timings[builder.NAME]:.1f} s ({directory})")
    return timings
