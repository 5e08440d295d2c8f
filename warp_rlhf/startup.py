"""Where `train`'s start-up goes: a line per phase while it runs, and ``startup.json`` at the first step.

``startup.json`` in the run directory holds the latest start of the run (a resume overwrites it): the
seconds of each phase in order, and ``first_step_s``, from the start of ``train`` to the end of the
first learner step.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from warp_rlhf.outputs import write_atomic

log = logging.getLogger("warp_rlhf")


class StartupTimes:
    def __init__(self, path: Path) -> None:
        self.path, self.began = path, time.perf_counter()
        self.phases: dict[str, float] = {}
        self.first_step_s: float | None = None
        self._lock = threading.Lock()  # every run's thread reports its steps

    @contextmanager
    def phase(self, name: str, announce: bool = True) -> Iterator[None]:
        """Time the block; ``announce`` logs its start too (not for checks whose errors must stand alone)."""
        if announce:
            log.info("start-up: %s ...", name)
        start = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - start)

    def record(self, name: str, seconds: float) -> None:
        self.phases[name] = round(seconds, 3)
        log.info("start-up: %s took %.1f s", name, seconds)

    def first_step(self) -> None:
        """Call after each step; the first call writes startup.json and logs the breakdown."""
        with self._lock:
            if self.first_step_s is not None:
                return
            self.first_step_s = round(time.perf_counter() - self.began, 3)
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        log.info("first step %.1f s after train started (%s)", self.first_step_s, parts)
        write_atomic(self.path, json.dumps({"first_step_s": self.first_step_s, "phases_s": self.phases}, indent=2))
