"""Ctrl-C for `warp-rlhf train`: the first SIGINT or SIGTERM stops cleanly, a second one at once.

First signal: every run stops at its next step boundary and writes its step checkpoint; during
start-up the driver stops at its next wait (within a second), during a merge when the merge is done.
Then the actors, placement groups and the Ray instance the run started are shut down and `train`
raises :class:`Interrupted`. Second signal: the Ray processes this run started are killed and the
process exits with 130 without unwinding; the last checkpoint is still there to resume from.

The handler itself never raises: an exception raised inside a signal handler surfaces wherever the
main thread happens to be, and inside Ray's blocking calls (``ray.wait``) it comes out as a
SystemError. It only records the signal and sets ``stop``; the driver checks at safe points.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("warp_rlhf")

EXIT_CODE = 130  # 128 + SIGINT, what shells report for a process ended by Ctrl-C


class Interrupted(Exception):
    """The user stopped the run (SIGINT or SIGTERM); its resume state is written."""


class StopOnSignal:
    """Turns SIGINT and SIGTERM into ``stop`` (an Event the step loops poll) or :class:`Interrupted`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event, ray_started: bool = False) -> None:
        self.stop, self.ray_started = stop, ray_started
        self.received: str | None = None
        self._cleaning = False  # shutting down already: nothing to interrupt
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """(Re)install the handlers; call again after anything that installs its own (``ray.init`` does)."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread receives signals; a library caller keeps its own handling
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    @contextmanager
    def stopping(self, stopped: type[Exception]) -> Iterator[None]:
        """Around the run's work: ``stopped`` (how a run or a wait gives up when ``stop`` is set) becomes
        :class:`Interrupted` when a signal set it; any other error stays itself."""
        try:
            yield
        except stopped as exc:
            self.check(exc)
            raise

    @contextmanager
    def cleaning(self) -> Iterator[None]:
        """Shut-down code: a first signal only says that it is already under way."""
        self._cleaning = True
        try:
            yield
        finally:
            self._cleaning = False

    def check(self, cause: BaseException | None = None) -> None:
        """Raise :class:`Interrupted` if a signal came (call at points where stopping is safe)."""
        if self.received is not None:
            raise Interrupted(f"stopped by {self.received}") from cause

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\nwarp-rlhf: {name} again: quitting now; resume from the last step checkpoint "
                        "with --resume\n".encode())  # fmt: skip
            self._kill_ray()
            os._exit(EXIT_CODE)
        self.received = name
        self.stop.set()
        if self._cleaning:
            log.warning("%s: already shutting down; send it again to quit at once", name)
        else:
            log.warning("%s: stopping (runs at their next step boundary, saving their state); send it again to "
                        "quit at once", name)  # fmt: skip

    def _kill_ray(self) -> None:
        """SIGKILL every process this run started: the Ray instance (GCS, raylet, the raylet's agents, the
        workers and engines) and anything else below this process.

        The descendants are listed before anything dies: a killed raylet's agents are re-parented and would
        no longer be found below us, and they only notice their raylet is gone some 30 s later.
        """
        if not self.ray_started:
            return
        try:
            import psutil

            descendants = psutil.Process().children(recursive=True)
        except Exception:  # noqa: BLE001 - exiting anyway; never a traceback on the second Ctrl-C
            descendants = []
        for process in descendants:
            with contextlib.suppress(Exception):
                process.kill()
        with contextlib.suppress(Exception):  # the killed LoRA engines' adapter directories in /dev/shm
            from actors.shm import remove_adapter_dirs

            remove_adapter_dirs(process.pid for process in descendants)
        try:
            import ray

            node = ray._private.worker._global_node
            if node is not None:  # whatever Ray started outside our process tree (none known, but its contract)
                node.kill_all_processes(check_alive=False, allow_graceful=False)
        except Exception:  # noqa: BLE001
            pass
