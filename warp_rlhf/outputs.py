"""The run directory: the output contract of architecture.md, and the logs written into it.

```
<output_dir>/config.yaml  iter-<i>/run-<m>/  iter-<i>/slerp/  iter-<i>/init/  metrics.parquet
            iter-<i>/snapshots/run-<m>-step-<t>/ (output.policy_every)   iter-<i>/lerp/ (studies)
            iter-<i>/adapters/run-<m>/ (learners.lora: the run's adapter, on θ_init of iteration i)
            samples/iter-<i>/run-<m>/steps-<a>-<b>.parquet   tensorboard/   pareto.parquet  pareto.png
            state/progress.json  state/iter-<i>/run-<m>/{learner/, progress.json}
```

Every file is written under a temporary name and renamed into place; iterations and runs are 1-based.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class SampleSpill:
    """One run's rollouts from step ``first`` on, written to Parquet as they come (a row group a step) instead of
    held in memory until a checkpoint: with ``warp.checkpoint_every: 0`` a 7B iteration's rollouts would all sit in
    the driver. The file appears under its final name, ``RunDir.samples(i, m, first, last)``, only at :meth:`close`.
    """

    def __init__(self, out: RunDir, i: int, m: int, first: int, enabled: bool = True) -> None:
        self.out, self.i, self.m, self.first, self.enabled = out, i, m, first, enabled
        self._writer: pq.ParquetWriter | None = None
        self._tmp = out.samples(i, m, first, first).with_name(f".steps-{first:06d}-open.parquet.tmp")

    def append(self, table: pa.Table) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table)

    def close(self, last: int) -> None:
        """Finish the file as steps first..last; nothing was appended: nothing written."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.out.samples(self.i, self.m, self.first, last))


def is_complete_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def iteration(self, i: int) -> Path:
        return self.root / f"iter-{i}"

    def policy(self, i: int, m: int) -> Path:
        return self.iteration(i) / f"run-{m}"

    def adapter(self, i: int, m: int) -> Path:
        """Run m's final LoRA adapter of iteration i (peft format; its base is θ_init of iteration i)."""
        return self.iteration(i) / "adapters" / f"run-{m}"

    def snapshot(self, i: int, m: int, step: int) -> Path:
        """Run m's policy after ``step`` steps of iteration i (output.policy_every)."""
        return self.iteration(i) / "snapshots" / f"run-{m}-step-{step}"

    def snapshots(self, i: int) -> list[tuple[int, int, Path]]:
        """(run, step, directory) of iteration i's complete snapshots, by run then step."""
        found = []
        for path in (self.iteration(i) / "snapshots").glob("run-*-step-*"):
            match = re.fullmatch(r"run-(\d+)-step-(\d+)", path.name)
            if match and is_complete_checkpoint(path):
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def slerp(self, i: int) -> Path:
        return self.iteration(i) / "slerp"

    def init(self, i: int) -> Path:
        return self.iteration(i) / "init"

    def lerp(self, i: int) -> Path:
        """The LERP of iteration i's policies, merged offline by `warp-rlhf study` to compare with its SLERP."""
        return self.iteration(i) / "lerp"

    def samples(self, i: int, m: int, first: int, last: int) -> Path:
        return self.root / "samples" / f"iter-{i}" / f"run-{m}" / f"steps-{first:06d}-{last:06d}.parquet"

    def run_state(self, i: int, m: int) -> Path:
        return self.state / f"iter-{i}" / f"run-{m}"

    def completed_iterations(self) -> int:
        path = self.state / "progress.json"
        return json.loads(path.read_text())["completed_iterations"] if path.is_file() else 0

    def mark_completed(self, i: int) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state / "progress.json", json.dumps({"completed_iterations": i}))


class MetricsLog:
    """One row per (iteration, run, step), kept in memory and rewritten atomically to metrics.parquet.

    Runs append from their own threads. TensorBoard gets every scalar under ``run-<m>/<name>`` with the
    cumulative step across iterations as its x axis.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = pq.read_table(path).to_pylist() if path.is_file() else []
        self._lock = threading.Lock()
        self._writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(tensorboard_dir))

    def keep(self, predicate) -> None:  # noqa: ANN001 - Callable[[dict], bool]
        """Drop rows a resumed run will produce again."""
        with self._lock:
            self.rows = [row for row in self.rows if predicate(row)]

    def append(self, row: dict[str, Any], global_step: int) -> None:
        with self._lock:
            self.rows.append(row)
            if self._writer is not None:
                for name, value in row.items():
                    if name not in ("iteration", "run", "step") and isinstance(value, int | float):
                        self._writer.add_scalar(f"run-{row['run']}/{name}", value, global_step)

    def flush(self) -> None:
        with self._lock:
            if self.rows:
                write_parquet_atomic(self.path, pa.Table.from_pylist(self.rows))
            if self._writer is not None:
                self._writer.flush()

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
