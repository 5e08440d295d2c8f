"""Ctrl-C for `warp-rlhf train`: the first SIGINT or SIGTERM stops cleanly, a second one at once.

First signal: every run stops at its next step boundary and writes its step checkpoint (outside the
step loop, during start-up or a merge, the run stops at once: there is nothing unsaved), then the
actors, placement groups and the Ray instance the run started are shut down and `train` raises
:class:`Interrupted`. Second signal: the Ray processes this run started are killed and the process
exits with 130 without unwinding; the last checkpoint is still there to resume from.
"""

from __future__ import annotations

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
        self._stepping = False  # inside the step loop: let the runs reach their step boundary
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
    def stepping(self, stopped: type[Exception]) -> Iterator[None]:
        """While the runs step: a signal stops them at their next step boundary instead of raising here.

        The runs then raise ``stopped``, which becomes :class:`Interrupted`; any other error stays itself.
        """
        self._stepping = True
        try:
            yield
        except stopped as exc:
            self._stepping = False
            self.check(exc)
            raise
        finally:
            self._stepping = False
        self.check()

    @contextmanager
    def cleaning(self) -> Iterator[None]:
        """Shut-down code: a first signal does not interrupt it (a second one still exits at once)."""
        self._cleaning = True
        try:
            yield
        finally:
            self._cleaning = False

    def check(self, cause: BaseException | None = None) -> None:
        """Raise :class:`Interrupted` if a signal came."""
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
            return
        if self._stepping:
            log.warning("%s: every run stops at its next step boundary and saves its state; send it again to "
                        "quit at once", name)  # fmt: skip
            return
        raise Interrupted(f"stopped by {name}")

    def _kill_ray(self) -> None:
        """Kill the local Ray instance this run started (its workers, engines included, follow the raylet)."""
        if not self.ray_started:
            return
        try:
            import ray

            node = ray._private.worker._global_node
            if node is not None:
                node.kill_all_processes(check_alive=False, allow_graceful=False)
        except Exception:  # noqa: BLE001 - exiting anyway; never a traceback on the second Ctrl-C
            pass
