"""The collective weight-broadcast wire protocol: one sender (a learner's rank 0), many engine workers.

Owns the group (a TCPStore at the sender's node address plus a bare ``ProcessGroupGloo`` or
``ProcessGroupNCCL``: vLLM and DeepSpeed already own the default group of their processes), the
bucket plan both sides derive from the same tensor specs, the sender's streaming broadcast and the
receivers' streaming iterator. Weights travel in buckets of whole tensors of at most ``bucket_bytes``
(a larger tensor is a bucket of its own), so neither side ever holds a full-model buffer: the sender
packs tensors as it reads them (gathered one at a time under ZeRO-3), a receiver hands each bucket's
tensors to vLLM's loader before receiving the next.

This is a wire contract like :mod:`actors.rollout`: the learners package imports it for its rank 0.
Imports torch lazily; never ray, vllm or deepspeed.
"""

from __future__ import annotations

import datetime
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from merger.flat import TensorSpec


@dataclass
class WeightGroup:
    """One member's handle on a weight-broadcast group; keeps the store alive as long as the group."""

    store: Any
    group: Any
    rank: int
    world_size: int
    device: str  # where buckets live: "cpu" for gloo, "cuda:<i>" for nccl


def open_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> WeightGroup:
    """Join a group as ``rank`` (> 0) at the sender's ``host:port``; blocks until all members have joined."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, False, timeout=timeout, wait_for_workers=False)
    return group_on_store(store, rank, world_size, backend, timeout_s)


def group_on_store(store: Any, rank: int, world_size: int, backend: str, timeout_s: float) -> WeightGroup:
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        return WeightGroup(store, dist.ProcessGroupGloo(store, rank, world_size, timeout), rank, world_size, "cpu")
    if backend != "nccl":
        raise ValueError(f"weight group backend {backend!r}: must be gloo or nccl")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    group = dist.ProcessGroupNCCL(store, rank, world_size, options)
    return WeightGroup(store, group, rank, world_size, f"cuda:{torch.cuda.current_device()}")


def specs_to_wire(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str, list[int], int, int]]:
    """Plain tuples: survive vLLM's msgpack RPC in multiprocess mode, where dataclasses do not."""
    return [(s.name, s.dtype, list(s.shape), s.offset, s.nbytes) for s in specs]


def specs_from_wire(wire: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, dtype, tuple(shape), int(off), int(nb)) for name, dtype, shape, off, nb in wire)


def bucket_plan(specs: Iterable[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive whole tensors per bucket, each bucket at most ``bucket_bytes`` unless one tensor is larger."""
    buckets: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        buckets.append(current)
    return buckets


def _broadcast(group: WeightGroup, tensor: Any) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.group.broadcast([tensor], options).wait()


# Fault injection (tests): the sender fails before this bucket (1-based), as a connection broken mid-way would.
FAULT_BUCKET_ENV = "WARP_RLHF_FAULT_BROADCAST_BUCKET"


class BroadcastSender:
    """Rank 0 of a weight-broadcast group, on the node whose address it is given.

    ``BroadcastSender(host, world_size, ...)`` opens the store on a port the OS picks on that node,
    without blocking; receivers are told ``address`` and join while :meth:`connect` waits for them.
    :meth:`send` streams named tensors, in spec order, bucket by bucket.
    """

    def __init__(self, host: str, world_size: int, backend: str, bucket_bytes: int, timeout_s: float = 300.0) -> None:
        import torch.distributed as dist

        self.world_size, self.backend, self.bucket_bytes, self.timeout_s = world_size, backend, bucket_bytes, timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(host, 0, world_size, True, timeout=timeout, wait_for_workers=False)
        self.address = (host, int(self._store.port))
        self.group: WeightGroup | None = None
        self.broadcasts = 0  # completed sends, for the run's placement record and tests
        self.pid = os.getpid()

    def connect(self) -> None:
        """Block until every receiver has joined (call after asking them to join)."""
        # The master store is reused, so its port cannot be taken between opening and joining.
        self.group = group_on_store(self._store, 0, self.world_size, self.backend, self.timeout_s)

    def send(self, specs: tuple[TensorSpec, ...], tensors: Iterable[tuple[str, Any]]) -> int:
        """Broadcast ``tensors`` (exactly ``specs``, in order, any device) bucket by bucket; returns bytes sent."""
        import torch

        if self.group is None:
            raise RuntimeError("BroadcastSender.send before connect()")
        stream = iter(tensors)
        sent = 0
        broken_at = os.environ.get(FAULT_BUCKET_ENV)
        for index, bucket in enumerate(bucket_plan(specs, self.bucket_bytes), 1):
            if broken_at == str(index):
                raise ConnectionError(f"{FAULT_BUCKET_ENV}: weight broadcast broken before bucket {index}")
            staging = torch.empty(sum(s.nbytes for s in bucket), dtype=torch.uint8, device=self.group.device)
            offset = 0
            for spec in bucket:
                name, tensor = next(stream)
                if name != spec.name:
                    raise RuntimeError(f"weight broadcast out of order: got {name!r} where {spec.name!r} was planned")
                flat = tensor.detach().reshape(-1).view(torch.uint8)
                staging[offset : offset + spec.nbytes].copy_(flat, non_blocking=True)
                offset += spec.nbytes
            _broadcast(self.group, staging)
            sent += offset
        # Resume the source once more: a ZeRO-3 gather of the last tensor is released only then.
        extra = next(stream, None)
        if extra is not None:
            raise RuntimeError(f"weight broadcast got {extra[0]!r} beyond the {len(specs)} planned tensors")
        self.broadcasts += 1
        return sent

    def close(self) -> None:
        self.group = None
        self._store = None


@dataclass
class ReceiveStats:
    """What one receiver buffered: the honest measure that no full-model buffer is ever allocated."""

    buckets: int = 0
    received_bytes: int = 0
    live_bytes: int = 0
    peak_bytes: int = 0  # most bucket bytes alive at once (a bucket lives until its last tensor view dies)
    largest_bucket: int = 0

    def allocated(self, nbytes: int) -> None:
        self.buckets += 1
        self.received_bytes += nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.largest_bucket = max(self.largest_bucket, nbytes)

    def freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def receive_stream(
    group: WeightGroup, specs: tuple[TensorSpec, ...], bucket_bytes: int, stats: ReceiveStats | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor view) for every spec, receiving each bucket only when the previous one is consumed."""
    import torch

    for bucket in bucket_plan(specs, bucket_bytes):
        nbytes = sum(s.nbytes for s in bucket)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=group.device)  # (N,)
        if stats is not None:
            stats.allocated(nbytes)
            # The storage, not the tensor object: views handed to vLLM keep it alive until they die.
            weakref.finalize(buffer.untyped_storage(), stats.freed, nbytes)
        _broadcast(group, buffer)
        offset = 0
        for spec in bucket:
            raw = buffer[offset : offset + spec.nbytes]
            yield spec.name, raw.view(getattr(torch, spec.dtype)).view(spec.shape)
            offset += spec.nbytes
        del buffer, raw
