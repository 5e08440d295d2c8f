"""DeepSpeed plumbing for one learner rank: the process group, the engine config, full-parameter access.

Owns: joining the rank's torch.distributed group (gloo on CPU, nccl on GPU), the DeepSpeed config
built from LearnersConfig, the Adam optimizer and its linear warm-up, and reading or writing *full*
parameters whatever the ZeRO stage (ZeRO-3 partitions them; they are gathered one tensor at a time
so no rank ever holds a second full copy of the model). Imports torch and deepspeed lazily; never
Ray or vLLM.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from warp_rlhf.config import LearnersConfig

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str) -> None:
    """Join (or, in-process with world size 1, reuse) the default process group through DeepSpeed."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        # Several world-size-1 learners may live in one process (tests, benchmarks); they share it.
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"this process already belongs to a group of {dist.get_world_size()} ranks (rank "
                f"{dist.get_rank()}); cannot also be rank {rank} of {world_size}"
            )
    else:
        # Another library in this process (an in-process vLLM engine's shutdown) may have destroyed an earlier
        # default group through torch directly: DeepSpeed still holds that group's clones, and its engine would
        # fail on them ("Group ... is not registered"). Drop them; DeepSpeed rebuilds them on the new group.
        from deepspeed.utils import groups

        groups._release_process_group_references(group=None)
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port or free_port(master_addr)),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
        )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with shm_op_skipped():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


SHM_OP = "deepspeed_shm_comm"  # the op's name in deepspeed.ops.__compatible_ops__ (DeepSpeed is pinned: pyproject)


@contextmanager
def shm_op_skipped() -> Iterator[None]:
    """The block initialises DeepSpeed's communication backend without its shared-memory all-reduce op.

    On the CPU accelerator the backend's init compiles a C++ op once per environment (40–80 s of both cores)
    and loads it in every process, whatever the dist backend, for one use: ``inference_all_reduce``, the
    all-reduce of DeepSpeed's tensor-parallel inference. A learner never calls it; its collectives are
    torch.distributed's. Marked incompatible for the init, the op is neither built nor loaded: no compiler
    at install or start-up, and none of a build's failure modes (a lock left by a learner killed
    mid-build, on which every later learner waited forever; a rebuild whenever two processes found
    different ninjas; an import deadlock between the lock watcher and DeepSpeed's builders). It is the
    only op DeepSpeed loads on our path; on CUDA there is none.
    """
    from deepspeed import ops

    compatible = ops.__compatible_ops__
    before = compatible.get(SHM_OP)
    compatible[SHM_OP] = False
    try:
        yield
    finally:
        if before is None:
            compatible.pop(SHM_OP, None)
        else:
            compatible[SHM_OP] = before


def deepspeed_config(cfg: LearnersConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: gradient accumulation is ours (explicit boundaries), so its GA count is 1."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Parameters smaller than this stay whole on every rank (DeepSpeed's default 1e5): set 0 to partition all.
        zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # we log our own metrics
        "wall_clock_breakdown": False,
    }


def warmup_factor(warmup_steps: int):
    """lr multiplier after s applied updates: (s+1)/W during the linear warm-up, then 1."""
    return lambda s: 1.0 if warmup_steps == 0 else min(1.0, (s + 1) / warmup_steps)


def make_optimizer(params, cfg: LearnersConfig) -> torch.optim.Optimizer:
    """torch AdamW: ZeRO supports it, and it needs no DeepSpeed op compiled per process."""
    import torch

    kwargs = dict(lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, eps=1e-8)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)  # one kernel over all tensors (CPU and CUDA)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def make_schedule(optimizer, warmup_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(warmup_steps))


def zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_parameters(module: torch.nn.Module, modify: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full parameter) pairs; under ZeRO-3 each is gathered only while the caller holds it.

    With ``modify``, writes made on rank 0 while a pair is held are kept and re-partitioned.
    Every rank must iterate to the end: the gathers are collectives.
    """
    import deepspeed

    partitioned = zero3(module)
    for name, param in module.named_parameters():
        context = (
            deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)
            if partitioned
            else nullcontext()
        )
        with context:
            yield name, param.data


def master_parameters(
    module: torch.nn.Module, optimizer: Any, trainable_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full fp32 master weight) pairs from DeepSpeed's optimizer, whatever the ZeRO stage.

    DeepSpeed keeps the fp32 copy of a bf16 model partitioned (ZeRO 1-3, where ``safe_get_full_fp32_param``
    assembles one parameter at a time, collectively: every rank must iterate to the end) or, without
    ZeRO, flat per parameter group in its FP16_Optimizer (also used for bf16). A bf16 parameter with no
    master copy anywhere is an error, never a silent bf16 "master". ``trainable_only``: only the
    parameters the optimizer updates (a LoRA adapter; its frozen base has no master).
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    flat = _flat_masters(optimizer)
    alone = not dist.is_initialized() or dist.get_world_size() == 1  # the same answer on every rank
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        mapping = getattr(param, "_hp_mapping", None)
        if alone and mapping is not None and mapping.lp_fragment_address.numel == param.numel():
            # One rank holds the whole master: a view of it, without the all-reduce safe_get_full_fp32_param does
            # (a full-size buffer per tensor, every step the EMA reads the masters).
            yield name, mapping.get_hp_fragment().view(param.shape)
            continue
        master = safe_get_full_fp32_param(param)
        if master is None:
            master = flat.get(id(param))
        if master is None:
            if not param.dtype.is_floating_point or param.element_size() == 4:
                master = param.data  # already fp32: the weights are their own master
            else:
                raise RuntimeError(f"no fp32 master weight for {name!r} in {type(optimizer).__name__}")
        yield name, master


def local_master_shards(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO-3: (HF name, this rank's fp32 master partition), flat and shaped like ``param.ds_tensor``; no collective.

    The partition the optimizer updates, not its rounding to the model dtype in ``ds_tensor``: what the EMA of a
    bf16 model follows. A parameter the optimizer does not update (frozen) yields its own partition.
    """
    from deepspeed.utils import safe_get_local_fp32_param

    for name, param in module.named_parameters():
        master = safe_get_local_fp32_param(param) if param.requires_grad else None
        yield name, param.ds_tensor.data if master is None else master


def load_master_parameters(module: torch.nn.Module, optimizer: Any, state: dict[str, torch.Tensor]) -> None:
    """Each low-precision parameter's fp32 master ← ``state[name]``, where that is fp32.

    Loading weights into a bf16 model rounds them, and DeepSpeed's ``refresh_fp32_params`` copies the rounded
    values into the masters. Where the weights are wider (the merger's fp32 θ_init), this puts the exact
    values back, so training continues from them and not from their rounding. Every rank calls it with the
    full state and writes only its own partition: no collective.
    """
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    flat = _flat_masters(optimizer)
    for name, param in module.named_parameters():
        value = state[name]
        if not param.requires_grad or param.element_size() >= 4 or value.dtype != torch.float32:
            continue  # fp32 parameters are their own masters, frozen ones have none, narrower values add nothing
        value = value.to(param.device)
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3, DeepSpeed's bf16 optimizer
            safe_set_full_fp32_param(param, value)
        elif id(param) in flat:
            with torch.no_grad():
                flat[id(param)].copy_(value)
        else:
            raise RuntimeError(f"no fp32 master weight for {name!r} in {type(optimizer).__name__}")


def _flat_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(param) → its fp32 master, for DeepSpeed's FP16 optimizers (also used for bf16 without ZeRO).

    FP16_UnfusedOptimizer (any client optimizer, e.g. torch AdamW) keeps one fp32 tensor per parameter
    in ``fp32_groups``; FP16_Optimizer keeps each group flat in ``fp32_groups_flat``.
    """
    groups = getattr(optimizer, "fp16_groups", None)
    if not groups:
        return {}
    if getattr(optimizer, "fp32_groups", None):
        return {id(p): m for params, masters in zip(groups, optimizer.fp32_groups, strict=True)
                for p, m in zip(params, masters, strict=True)}  # fmt: skip
    flats = getattr(optimizer, "fp32_groups_flat", None)
    if not flats:
        return {}
    views = {}
    for params, flat in zip(groups, flats, strict=True):
        offset = 0
        for param in params:  # _flatten_dense_tensors packs them back to back, in this order
            views[id(param)] = flat[offset : offset + param.numel()].view(param.shape)
            offset += param.numel()
    return views


def agree(values: list[int], world_size: int, device: Any) -> tuple[int, int, int, int]:
    """(Σ rows, max micro-batches, Σ non-finite flags, Σ cut-group flags) over ranks: one small collective."""
    import torch
    import torch.distributed as dist

    local = torch.tensor(values, dtype=torch.int64, device=device)
    if world_size == 1:
        return tuple(int(v) for v in local)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered)  # (R, 4)
    return int(table[:, 0].sum()), int(table[:, 1].max()), int(table[:, 2].sum()), int(table[:, 3].sum())


def agree_sum(values: list[float], world_size: int, device: Any) -> list[float]:
    """Each value summed over ranks (float64)."""
    import torch
    import torch.distributed as dist

    local = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(local)
    return [float(v) for v in local]


def barrier(world_size: int) -> None:
    import torch.distributed as dist

    if world_size > 1:
        dist.barrier()
