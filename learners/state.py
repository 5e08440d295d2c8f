"""One learner rank's resume state on disk: DeepSpeed's checkpoint, the EMA anchor, the RNG, the counters.

Every rank writes into the same directory: its DeepSpeed shard and RNG state, its anchor shard when the
anchor is partitioned (ZeRO-3), else rank 0 the whole anchor; rank 0 also the step counters. The caller
renames a finished directory into place. Imports torch and safetensors lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from learners.anchor import EmaAnchor, PartitionedAnchor

DS_TAG = "deepspeed"


def save_rank_state(
    directory: str | Path, engine: Any, anchor: EmaAnchor | PartitionedAnchor, rank: int, counters: dict[str, int]
) -> None:
    """Write rank ``rank``'s part; ``counters`` (steps, updates, version) are written by rank 0."""
    import torch
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False)
    torch.save(rng_state(), path / f"rng-rank{rank}.pt")
    if rank == 0 or anchor.partitioned:
        save_file(anchor.state_dict(), str(path / anchor_file(anchor, rank)))
    if rank == 0:
        (path / "learner.json").write_text(json.dumps(dict(counters, anchor_updates=anchor.updates)))


def load_rank_state(directory: str | Path, engine: Any, anchor: EmaAnchor | PartitionedAnchor, rank: int) -> dict:
    """Restore what save_rank_state wrote (same ranks, same ZeRO stage); returns the counters."""
    import torch
    from safetensors.torch import load_file

    path = Path(directory)
    counters = json.loads((path / "learner.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)  # fmt: skip
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {str(path)!r}")
    anchor.load_state_dict(load_file(str(path / anchor_file(anchor, rank))), counters["anchor_updates"])
    set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=True))
    return counters


def anchor_file(anchor: EmaAnchor | PartitionedAnchor, rank: int) -> str:
    """A partitioned anchor is saved shard by shard, one file per rank; a full one once, by rank 0."""
    return f"anchor-rank{rank}.safetensors" if anchor.partitioned else "anchor.safetensors"


def rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
