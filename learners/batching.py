"""How one learner step's rows are laid out: prompts (RLOO groups) to ranks, rows to micro-batches.

Owns only index arithmetic on ``group_id`` arrays (numpy). All samples of one prompt stay on one rank
and, whenever the group fits, in one micro-batch, so a rank can compute the leave-one-out baseline
from the micro-batch it is about to differentiate, without a second forward pass. Imports numpy only.
"""

from __future__ import annotations

import numpy as np


def split_groups(group_ids: np.ndarray, parts: int) -> list[np.ndarray]:
    """Row indices for each of ``parts`` ranks, whole groups only, groups in sorted order, rows balanced.

    group_ids (B,) → ``parts`` arrays of row indices (each sorted). Needs at least ``parts`` groups:
    a rank without rows would have nothing to differentiate in the step's collectives.
    """
    groups, inverse, counts = np.unique(group_ids, return_inverse=True, return_counts=True)
    if len(groups) < parts:
        raise ValueError(f"{len(groups)} prompt groups cannot be split over {parts} learner ranks; need >= {parts}")
    # Cut the cumulative row count at even targets, so ranks get about B/parts rows each.
    ends = np.cumsum(counts)  # (G,)
    cuts = [int(np.searchsorted(ends, len(group_ids) * k / parts, side="left")) + 1 for k in range(1, parts)]
    cuts = [min(max(c, k + 1), len(groups) - (parts - 1 - k)) for k, c in enumerate(cuts)]  # >= 1 group each
    rank_of_group = np.searchsorted(np.asarray(cuts), np.arange(len(groups)), side="right")  # (G,)
    rank_of_row = rank_of_group[inverse]  # (B,)
    return [np.flatnonzero(rank_of_row == r) for r in range(parts)]


def pack_micro_batches(group_ids: np.ndarray, capacity: int) -> tuple[list[np.ndarray], bool]:
    """Row indices of each micro-batch of at most ``capacity`` rows, whole groups packed in order.

    Returns (micro-batches, intact): intact is false when some group has more rows than ``capacity``
    and had to be cut, in which case per-micro-batch baselines would be wrong and the caller must
    compute advantages over the whole batch first.
    """
    groups, inverse = np.unique(group_ids, return_inverse=True)
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size, intact = 0, True
    for g in range(len(groups)):
        rows = np.flatnonzero(inverse == g)
        if len(rows) > capacity:
            intact = False
        for start in range(0, len(rows), capacity):
            chunk = rows[start : start + capacity]
            if size + len(chunk) > capacity and current:
                batches.append(np.concatenate(current))
                current, size = [], 0
            current.append(chunk)
            size += len(chunk)
    if current:
        batches.append(np.concatenate(current))
    return batches, intact
