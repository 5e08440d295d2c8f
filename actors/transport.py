"""Weight transport: how a learner's FlatWeights reach every engine of a pool after each step.

One interface (:class:`WeightTransport`), two implementations chosen by ``actors.weight_transport``:

- :class:`ObjectStoreTransport` (default): the weights are put into Ray's object store once; every
  engine gets them zero-copy (a read-only numpy view) and loads them in place.
- :class:`CollectiveTransport`: a torch.distributed group of the sender (rank 0) and every engine
  worker; the FlatWeights buffer is broadcast in large slices (``actors.bucket_mb``), gloo on CPU and
  nccl on GPU. The sender side, :class:`WeightSender`, uses only torch.distributed and FlatWeights so
  the learners package can hold it on its rank 0.

Groups are built from a TCPStore and a bare ``ProcessGroupGloo``/``ProcessGroupNCCL`` instead of
``init_process_group``, because vLLM and DeepSpeed already own the default group of their process.
Imports ray and torch lazily; never imports vllm or deepspeed.
"""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from merger.flat import FlatWeights

if TYPE_CHECKING:
    import torch


@dataclass
class WeightGroup:
    """One member's handle on a weight-broadcast group; keeps the store alive as long as the group."""

    store: Any
    group: Any
    rank: int
    world_size: int
    device: str  # where broadcast buffers live: "cpu" for gloo, "cuda" for nccl


def open_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> WeightGroup:
    """Join a group as ``rank`` (> 0); blocks until all ``world_size`` members have joined."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, False, timeout=timeout, wait_for_workers=False)
    return _group_on_store(store, rank, world_size, backend, timeout_s)


def _group_on_store(store: Any, rank: int, world_size: int, backend: str, timeout_s: float) -> WeightGroup:
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


def _slices(total: int, bucket: int) -> list[tuple[int, int]]:
    return [(start, min(start + bucket, total)) for start in range(0, total, bucket)]


def receive_buffer(group: WeightGroup, total_nbytes: int, bucket_bytes: int) -> torch.Tensor:
    """Receive rank 0's broadcast into a fresh uint8 tensor on the group's device."""
    import torch

    buffer = torch.empty(total_nbytes, dtype=torch.uint8, device=group.device)  # (N,)
    for start, end in _slices(total_nbytes, bucket_bytes):
        # Broadcast writes in place into the slice view: no staging copy on the receiver.
        group.group.broadcast([buffer[start:end]], _root0()).wait()
    return buffer


def _root0() -> Any:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options


class WeightSender:
    """Rank 0 of a weight-broadcast group: the learner's rank 0, or the driver in tests and benchmarks.

    ``WeightSender(world_size)`` opens the store (a free port) without blocking; the receivers are
    told ``address`` and join while :meth:`connect` waits for them. :meth:`send` broadcasts a whole
    FlatWeights buffer in ``bucket_bytes`` slices (staged on the GPU for nccl).
    """

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        host: str = "127.0.0.1",
        bucket_bytes: int = 256 << 20,
        timeout_s: float = 120.0,
    ) -> None:
        import torch.distributed as dist

        self.world_size, self.backend, self.bucket_bytes, self.timeout_s = world_size, backend, bucket_bytes, timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(host, 0, world_size, True, timeout=timeout, wait_for_workers=False)
        self.address = (host, int(self._store.port))
        self._group: WeightGroup | None = None

    def connect(self) -> None:
        """Block until every receiver has joined (call after asking them to join)."""
        # Rank 0 reuses the master store it already opened, so the port cannot be taken in between.
        self._group = _group_on_store(self._store, 0, self.world_size, self.backend, self.timeout_s)

    def send(self, weights: FlatWeights) -> None:
        import torch

        if self._group is None:
            raise RuntimeError("WeightSender.send before connect()")
        with warnings.catch_warnings():
            # A read-only Ray view is fine: the root of a broadcast only reads its buffer.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(weights.buffer)  # (N,) uint8
        for start, end in _slices(weights.nbytes, self.bucket_bytes):
            chunk = source[start:end]
            if self._group.device != "cpu":
                chunk = chunk.to(self._group.device, non_blocking=True)
            self._group.group.broadcast([chunk], _root0()).wait()

    def close(self) -> None:
        self._group = None
        self._store = None


class WeightTransport(Protocol):
    """What ActorPool needs from a transport. ``send`` returns one ObjectRef per engine (its load)."""

    def connect(self, engines: list[Any]) -> None: ...

    def send(self, engines: list[Any], weights: Any, version: int) -> list[Any]: ...

    def close(self) -> None: ...


class ObjectStoreTransport:
    """Put once, load everywhere: ``weights`` is a FlatWeights or an ObjectRef to one."""

    def connect(self, engines: list[Any]) -> None:
        pass  # nothing to set up: the object store is always there

    def send(self, engines: list[Any], weights: Any, version: int) -> list[Any]:
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        # A top-level ObjectRef argument is resolved by Ray in each engine: one zero-copy read each.
        return [engine.load_weights.remote(ref, version) for engine in engines]

    def close(self) -> None:
        pass


class CollectiveTransport:
    """This process is rank 0 (the sender); engine workers are ranks 1..W. ``weights`` is a FlatWeights."""

    def __init__(self, backend: str, bucket_bytes: int, host: str = "127.0.0.1", timeout_s: float = 120.0):
        self.backend, self.bucket_bytes, self.host, self.timeout_s = backend, bucket_bytes, host, timeout_s
        self.sender: WeightSender | None = None

    def connect(self, engines: list[Any]) -> None:
        import ray

        self.close()
        workers = ray.get([engine.num_workers.remote() for engine in engines])
        world_size = 1 + sum(workers)
        self.sender = WeightSender(world_size, self.backend, self.host, self.bucket_bytes, self.timeout_s)
        host, port = self.sender.address
        bases = [1 + sum(workers[:i]) for i in range(len(engines))]
        joins = [
            engine.join_weight_group.remote(host, port, base, world_size, self.backend, self.timeout_s)
            for engine, base in zip(engines, bases, strict=True)
        ]
        self.sender.connect()
        ray.get(joins)

    def begin_receive(self, engines: list[Any], weights: FlatWeights, version: int) -> list[Any]:
        """Ask every engine to receive; the broadcast itself is rank 0's (this sender's or a learner's)."""
        from actors.worker_extension import specs_to_wire

        wire = specs_to_wire(weights.specs)
        return [e.receive_weights.remote(wire, weights.nbytes, self.bucket_bytes, version) for e in engines]

    def send(self, engines: list[Any], weights: Any, version: int) -> list[Any]:
        import ray

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)  # zero-copy view; the broadcast reads it once
        if self.sender is None:
            self.connect(engines)
        refs = self.begin_receive(engines, weights, version)
        self.sender.send(weights)
        return refs

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


def make_transport(kind: str, num_gpus: float, bucket_bytes: int) -> WeightTransport:
    if kind == "object_store":
        return ObjectStoreTransport()
    if kind == "collective":
        return CollectiveTransport("nccl" if num_gpus > 0 else "gloo", bucket_bytes)
    raise ValueError(f"actors.weight_transport = {kind!r}: must be object_store or collective")
