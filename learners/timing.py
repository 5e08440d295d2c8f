"""Seconds per phase of a learner step, reported with its metrics (metrics.parquet columns time_<phase>_s)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Phases:
    """``with clock("forward"): ...`` adds the block's seconds to ``seconds["time_forward_s"]``.

    ``sync``: called before each clock read where the work is asynchronous (``torch.cuda.synchronize`` on a
    GPU), so a phase's seconds are its kernels' and not their launches'. The learner already waits for the
    device once per micro-batch (it reads the loss back), so the extra waits cost microseconds per step.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = sync or (lambda: None)

    @classmethod
    def on(cls, device: torch.device) -> Phases:
        """The clock for work on ``device``: synchronised around each phase on CUDA, plain elsewhere."""
        if device.type == "cuda":
            import torch

            return cls(torch.cuda.synchronize)
        return cls()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            key = f"time_{phase}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
