"""Prompts: read with pyarrow from Parquet or JSONL, and drawn per run in a seeded, resumable order.

The packaged demo set (movie-review openings, written for this project) lives in ``warp_rlhf/data``:
``train.jsonl`` for training and ``eval.jsonl``, a held-out split never used in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

PACKAGED = Path(__file__).with_name("data")


class PromptError(ValueError):
    """A prompt file is missing, unreadable, lacks the prompt column, or is empty."""


def read_prompt_table(path: str | Path, column: str = "prompt") -> pa.Table:
    """A table with at least ``column`` (non-empty strings) from a .parquet or .jsonl/.json file."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} does not exist")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            table = pj.read_json(path)
        else:
            raise PromptError(f"prompt file {str(path)!r}: expected a .parquet or .jsonl file")
    except pa.ArrowInvalid as exc:
        raise PromptError(f"prompt file {str(path)!r} is unreadable: {exc}") from None
    if column not in table.column_names:
        raise PromptError(
            f"prompt file {str(path)!r} has no column {column!r} (columns: {', '.join(table.column_names)}); "
            "set data.prompt_column"
        )
    if not pa.types.is_string(table.schema.field(column).type) and not pa.types.is_large_string(
        table.schema.field(column).type
    ):
        raise PromptError(f"prompt file {str(path)!r}: column {column!r} must hold strings")
    texts = table.column(column).to_pylist()
    if not texts:
        raise PromptError(f"prompt file {str(path)!r} holds no prompts")
    empty = next((i for i, t in enumerate(texts) if not t or not t.strip()), None)
    if empty is not None:
        raise PromptError(f"prompt file {str(path)!r}: row {empty} has an empty prompt")
    return table


def load_prompts(path: str, column: str, split: str) -> list[str]:
    """Prompt texts from ``path``, or the packaged ``split`` ("train" or "eval") when ``path`` is empty."""
    source: str | Path = path
    if not path:
        source, column = PACKAGED / f"{split}.jsonl", "prompt"
    return read_prompt_table(source, column).column(column).to_pylist()


@dataclass
class PromptSampler:
    """Endless epochs over the prompts, reshuffled each epoch from (seed, epoch); resumable by position.

    Each run has its own seed, hence its own prompt order, as the method asks.
    """

    num_prompts: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts)

    def draw(self, count: int) -> list[int]:
        """Indices of the next ``count`` prompts."""
        out: list[int] = []
        order = self._order()
        while len(out) < count:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            take = min(count - len(out), self.num_prompts - self.position)
            out.extend(int(i) for i in order[self.position : self.position + take])
            self.position += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
