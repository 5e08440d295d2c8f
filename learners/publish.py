"""Sending a learner's weights to its engines: the learner side of the collective broadcast.

Owns :class:`Broadcaster`, held by every LearnerRank: on rank 0 it opens the broadcast group at the
address of rank 0's own node and streams the full parameters bucket by bucket as they are read
(gathered one tensor at a time under ZeRO-3); on the other ranks it only takes part in the gathers.
The wire protocol itself is :mod:`actors.broadcast` (a contract shared with the engines' workers).
Imports torch (through learners.lora, whose parameter names it sends); never Ray or vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from learners.lora import hf_name, is_adapter
from merger.flat import TensorSpec, allocate

if TYPE_CHECKING:
    import torch

    from actors.broadcast import BroadcastSender


def param_specs(module: torch.nn.Module) -> tuple[TensorSpec, ...]:
    """Full-tensor specs (HF names, model dtype, full shapes even under ZeRO-3) in parameter order.

    A LoRA policy is sent merged (:func:`learners.lora.merged_parameters`): its frozen weights' specs under
    their HF names, the adapter factors left out.
    """
    entries = []
    for peft_name, param in module.named_parameters():
        if is_adapter(peft_name):
            continue
        name = hf_name(peft_name)
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape aside
        numel = 1
        for size in shape:
            numel *= size
        entries.append((name, str(param.dtype).removeprefix("torch."), shape, numel * param.element_size()))
    return allocate(entries).specs if entries else ()


class Broadcaster:
    """One rank's part in sending weights; ``rank == 0`` is the sender."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.sender: BroadcastSender | None = None
        self.specs: tuple[TensorSpec, ...] = ()

    def open(
        self, module: torch.nn.Module, host: str, world_size: int, backend: str, bucket_bytes: int, timeout_s: float
    ) -> tuple[str, int, list]:
        """Rank 0: open a new group at ``host`` (this node's address), replacing any previous one."""
        from actors.broadcast import BroadcastSender, specs_to_wire

        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank} cannot send weights: rank 0 is the sender")
        self.close()
        self.specs = param_specs(module)
        self.sender = BroadcastSender(host, world_size, backend, bucket_bytes, timeout_s)
        return (*self.sender.address, specs_to_wire(self.specs))

    def connect(self) -> None:
        if self.sender is None:
            raise RuntimeError("connect before open")
        self.sender.connect()

    def send(self, pairs: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Every rank calls it with the policy's (HF name, full tensor) pairs, in ``param_specs`` order
        (ZeRO-3 gathers are collective); rank 0 broadcasts, returns bytes sent."""
        if self.rank != 0:
            for _ in pairs:
                pass
            return 0
        if self.sender is None:
            raise RuntimeError("broadcast before the weight group was opened")
        try:
            return self.sender.send(self.specs, pairs)
        except BaseException:
            # Dropping the group closes its connections, so receivers still waiting fail at once
            # instead of at the timeout; the pool then re-forms a group or falls back to the object store.
            self.close()
            # Under ZeRO-3 the other ranks go on gathering tensor after tensor to the end of ``pairs``: take part in
            # every gather they make, so that the ranks leave this call in step. Stopping here left them waiting in a
            # gather, and the object-store fallback's own gathers then met theirs out of order.
            for _ in pairs:
                pass
            raise

    def info(self) -> dict[str, Any]:
        """Who sends, from where, how often: recorded in the run's placement.json and checked by tests."""
        if self.sender is None:
            return {"pid": os.getpid(), "address": None, "broadcasts": 0}
        host, port = self.sender.address
        return {"pid": self.sender.pid, "address": f"{host}:{port}", "broadcasts": self.sender.broadcasts}

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
