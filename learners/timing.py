"""Seconds per phase of a learner step, reported with its metrics (metrics.parquet columns time_<phase>_s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Phases:
    """``with clock("forward"): ...`` adds the block's seconds to ``seconds["time_forward_s"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time_{phase}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
