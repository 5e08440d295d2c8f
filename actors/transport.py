"""Weight transport: how new weights reach every engine of a pool, after each step and each iteration.

One interface (:class:`WeightTransport`), two implementations chosen by ``actors.weight_transport``:

- :class:`ObjectStoreTransport` (default): the weights are in Ray's object store once; every engine
  gets them zero-copy (a read-only numpy view) and loads them in place.
- :class:`CollectiveTransport`: the *publisher* of the weights (a learner's rank 0, see
  :class:`WeightPublisher`) broadcasts them to every engine worker in buckets of ``actors.bucket_mb``
  over gloo (CPU) or nccl (GPU), rendezvoused at the publisher's own node address. The driver only
  orchestrates: not one byte of the weights passes through it. The wire protocol is
  :mod:`actors.broadcast`.

What a pool syncs from is a *source*: FlatWeights, an ObjectRef to FlatWeights, an HF directory (θ_init
as the merger wrote it, once per iteration: every engine reads it itself, under either transport), or a
publisher. A LoRA run's step sends a second kind of message, its adapter (:mod:`actors.adapter`):
``send_adapter``, through the object store under either transport (it is megabytes).
Imports ray lazily; never vllm or deepspeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from merger.flat import FlatWeights


@runtime_checkable
class WeightPublisher(Protocol):
    """What holds live weights and can send them: :class:`learners.LearnerGroup` implements it.

    Calls that involve remote work return ObjectRefs so the transport can start the receivers
    at the same time; ``open_broadcast`` returns the group's address and the tensor specs (wire form).
    """

    def weights_ref(self, version: int | None = None) -> Any: ...

    def open_broadcast(
        self, world_size: int, backend: str, bucket_bytes: int, timeout_s: float
    ) -> tuple[str, int, list]: ...

    def connect_broadcast(self) -> list[Any]: ...

    def broadcast(self, version: int) -> list[Any]: ...


def as_ref(source: Any, version: int | None = None) -> Any:
    """What every engine loads from: an HF directory's path as it is (each engine reads it), else an ObjectRef to
    FlatWeights (a publisher exports its weights once, into the store)."""
    import ray

    if isinstance(source, ray.ObjectRef):
        return source
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, FlatWeights):
        return ray.put(source)
    if isinstance(source, WeightPublisher):
        return source.weights_ref(version)
    raise TypeError(f"cannot sync weights from a {type(source).__name__}")


def adapter_ref(source: Any, version: int | None = None) -> Any:
    """An ObjectRef to AdapterWeights from AdapterWeights, a reference to them, or a LoRA learner."""
    import ray

    from actors.adapter import AdapterWeights

    if isinstance(source, ray.ObjectRef):
        return source
    if isinstance(source, AdapterWeights):
        return ray.put(source)
    if hasattr(source, "adapter_ref"):
        return source.adapter_ref(version)
    raise TypeError(f"cannot sync an adapter from a {type(source).__name__}")


class WeightTransport(Protocol):
    """What ActorPool needs from a transport. ``send`` and ``send_adapter`` return one ObjectRef per engine
    (its load)."""

    def send(self, engines: list[Any], source: Any, version: int) -> list[Any]: ...

    def send_adapter(self, engines: list[Any], source: Any, version: int, run: int) -> list[Any]: ...

    def reset(self) -> None: ...


class ObjectStoreTransport:
    """Put once, load everywhere."""

    def send(self, engines: list[Any], source: Any, version: int) -> list[Any]:
        ref = as_ref(source, version)
        # A top-level ObjectRef argument is resolved by Ray in each engine: one zero-copy read each.
        return [engine.load_weights.remote(ref, version) for engine in engines]

    def send_adapter(self, engines: list[Any], source: Any, version: int, run: int) -> list[Any]:
        ref = adapter_ref(source, version)
        return [engine.load_adapter.remote(ref, run) for engine in engines]

    def reset(self) -> None:
        pass  # nothing persistent: the object store is always there


class CollectiveTransport:
    """The publisher is rank 0; the engines' workers are ranks 1..W, numbered engine by engine."""

    def __init__(self, backend: str, bucket_bytes: int, timeout_s: float = 300.0) -> None:
        self.backend, self.bucket_bytes, self.timeout_s = backend, bucket_bytes, timeout_s
        self._publisher: Any = None  # the publisher the current group belongs to
        self._wire_specs: list | None = None
        self.address: tuple[str, int] | None = None  # (host, port) of the current group, for the run record

    def connect(self, engines: list[Any], publisher: WeightPublisher) -> None:
        """Form the group: the publisher opens it on its node, every engine worker joins."""
        import ray

        workers = ray.get([engine.num_workers.remote() for engine in engines])
        world_size = 1 + sum(workers)
        host, port, self._wire_specs = publisher.open_broadcast(
            world_size, self.backend, self.bucket_bytes, self.timeout_s
        )
        bases = [1 + sum(workers[:i]) for i in range(len(engines))]
        joins = [
            engine.join_weight_group.remote(host, port, base, world_size, self.backend, self.timeout_s)
            for engine, base in zip(engines, bases, strict=True)
        ]
        ray.get(publisher.connect_broadcast() + joins)
        self._publisher, self.address = publisher, (host, port)

    def send(self, engines: list[Any], source: Any, version: int) -> list[Any]:
        import ray

        if not isinstance(source, WeightPublisher):
            # θ_init is a directory every engine reads itself (or weights already in the object store): no group.
            return ObjectStoreTransport().send(engines, source, version)
        if self._publisher is not source:
            self.connect(engines, source)
        loads = [e.receive_weights.remote(self._wire_specs, self.bucket_bytes, version) for e in engines]
        ray.get(source.broadcast(version))  # a broken group raises here, on the sender's side
        return loads

    def send_adapter(self, engines: list[Any], source: Any, version: int, run: int) -> list[Any]:
        # Megabytes: a broadcast group would cost more to keep than the object store's one read per node.
        return ObjectStoreTransport().send_adapter(engines, source, version, run)

    def reset(self) -> None:
        """Forget the group (an engine was replaced, or a broadcast failed): the next send forms a new one."""
        self._publisher, self._wire_specs, self.address = None, None, None


def make_transport(kind: str, num_gpus: float, bucket_bytes: int, timeout_s: float = 300.0) -> WeightTransport:
    if kind == "object_store":
        return ObjectStoreTransport()
    if kind == "collective":
        return CollectiveTransport("nccl" if num_gpus > 0 else "gloo", bucket_bytes, timeout_s)
    raise ValueError(f"actors.weight_transport = {kind!r}: must be object_store or collective")
