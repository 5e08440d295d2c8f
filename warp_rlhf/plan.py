"""``warp-rlhf plan``: where a run's actors go and whether they fit in memory, before anything starts.

Owns the memory estimates of one actor of each role (a learner rank, an engine worker, the reward model,
the merger), their sum on each node's GPUs and RAM, and the report. Placement comes from
:mod:`warp_rlhf.placement`, model sizes from :mod:`warp_rlhf.model_size`. Pure arithmetic on the config and
model shapes: imports no Ray, torch, vLLM or DeepSpeed.

Learner accounting is mixed-precision Adam as in the ZeRO paper (Rajbhandari et al. 2020): weights and grads
in the model dtype, an fp32 master copy (bf16 only) and two fp32 Adam moments; ZeRO stage 1 splits the
optimizer states over the R ranks, stage 2 also the grads, stage 3 also the weights. The EMA anchor is an
fp32 accumulator plus a model-dtype copy (bf16 only), split over the ranks under ZeRO-3 and whole otherwise.
Activations are the worst case: every sequence of a micro-batch max_model_len tokens, no recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from warp_rlhf.config import Config
from warp_rlhf.model_size import DTYPE_BYTES, ModelShape
from warp_rlhf.placement import GroupSpec, Node, PlacementError, assign, group_specs

GIB = 2**30
CUDA_RUNTIME_GIB = 1.0
"""One GPU process's CUDA context, cuBLAS workspace and NCCL buffers."""
ENGINE_RUNTIME_GIB = 2.0
"""A vLLM GPU worker beyond weights and KV cache: CUDA context, CUDA graphs, the forward pass's activation peak."""
PROCESS_RAM_GIB = 0.5
"""Host RAM of one actor process: Python, torch, Ray (about 0.35 GiB measured after the imports)."""
CUDA_HOST_RAM_GIB = 1.0
"""More host RAM for a GPU process: CUDA libraries and pinned staging buffers."""
CPU_ENGINE_RUNTIME_GIB = 0.5
"""A vLLM CPU engine beyond weights and KV cache: its forward pass's activations and scheduler state."""
DEEPSPEED_REDUCE_BUCKET = 5e8
"""DeepSpeed's default reduce_bucket_size, in elements."""
DEEPSPEED_LIVE_PARAMS = 1e9
"""DeepSpeed's default stage3_max_live_parameters: gathered ZeRO-3 weights held at once."""

Items = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Estimate:
    """Memory of one actor process, item by item, in GiB."""

    actor: str
    gpu: Items
    """On the GPU the actor uses (each GPU, for an engine's tensor-parallel workers)."""
    host: Items
    """In its node's RAM."""

    @property
    def gpu_gib(self) -> float:
        return sum(v for _, v in self.gpu)

    @property
    def host_gib(self) -> float:
        return sum(v for _, v in self.host)


@dataclass(frozen=True)
class Placed:
    """Consecutive bundles of one group on one node."""

    group: str
    bundles: str
    node: str
    node_type: str
    bundle: str
    strategy: str


@dataclass(frozen=True)
class NodeUse:
    """Estimated memory on one node: each GPU, and RAM."""

    node: str
    node_type: str
    gpu_gib: tuple[float, ...]
    gpu_actors: tuple[str, ...]
    gpu_capacity_gib: float | None
    ram_gib: float
    ram_capacity_gib: float | None


@dataclass(frozen=True)
class Plan:
    cfg: Config
    model: ModelShape
    rows: tuple[Placed, ...]
    estimates: tuple[Estimate, ...]
    usage: tuple[NodeUse, ...]
    notes: tuple[str, ...]
    failures: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------------------------------------
# Estimates of one actor of each role


def activation_bytes(shape: ModelShape, tokens: int, completion_tokens: int, b: int) -> float:
    """Peak activation memory of one micro-batch through an HF Llama-style decoder (SDPA, no recomputation).

    Per token and layer, what autograd keeps: two RMSNorms (fp32 input 4h, output b·h each), SDPA's q, k, v
    and output (K and V repeated to full width when a padding mask is passed), the gated MLP's gate, its
    activation, up and their product (4 × b·i), plus b·h of margin. Checked with saved_tensors_hooks on
    padded batches through learners.objective on CPU: 5% below, all of it two b·h copies that CPU linear
    layers keep (CUDA ones keep views). Logits: the model dtype for every position, then the completion
    positions' slice, its fp32 copy, log-softmax and the entropy's temporaries.
    """
    h, i = shape.hidden, shape.intermediate
    per_layer = b * (7 * h + 4 * i) + 8 * h
    logits = tokens * shape.vocab * b + completion_tokens * shape.vocab * (b + 12)
    return tokens * shape.layers * per_layer + logits


def learner_estimate(cfg: Config, shape: ModelShape) -> Estimate:
    lr, p, b = cfg.learners, shape.params, DTYPE_BYTES[cfg.model.dtype]
    bf16 = cfg.model.dtype == "bfloat16"
    split = lambda stage: lr.ranks if lr.zero_stage >= stage else 1  # ZeRO stage that partitions an item
    states: list[tuple[str, float]] = [("weights", p * b / split(3)), ("grads", p * b / split(2))]
    if bf16:
        states.append(("fp32 master weights", 4 * p / split(1)))
    states.append(("Adam moments", 8 * p / split(1)))
    anchor = [("EMA anchor", (4 * p + (p * b if bf16 else 0)) / split(3))]
    tokens = lr.micro_batch_size * cfg.actors.max_model_len
    completion = lr.micro_batch_size * cfg.actors.max_new_tokens
    live = min(p, DEEPSPEED_LIVE_PARAMS) if lr.zero_stage == 3 else 0
    work = [
        ("activations", activation_bytes(shape, tokens, completion, b)),
        ("DeepSpeed buckets", b * (min(p, DEEPSPEED_REDUCE_BUCKET) + live)),
    ]
    process = _process(lr.num_gpus)
    if lr.num_gpus == 0:
        return _estimate("learner rank", [], states + anchor + work + process)
    on_gpu = states + ([] if lr.anchor_on_cpu else anchor) + work + [("CUDA runtime", CUDA_RUNTIME_GIB * GIB)]
    loading = [("checkpoint read before moving to the GPU", p * b)]
    return _estimate("learner rank", on_gpu, loading + (anchor if lr.anchor_on_cpu else []) + process)


def engine_estimate(cfg: Config, shape: ModelShape) -> Estimate:
    a, b = cfg.actors, DTYPE_BYTES[cfg.model.dtype]
    weights = shape.params * b / (a.tensor_parallel_size if a.num_gpus > 0 else 1)
    process = _process(a.num_gpus)
    if a.weight_transport == "object_store":
        process.append(("weights fetched from the object store", weights))
    if a.num_gpus == 0:
        items = [("weights", weights), ("KV cache", a.kv_cache_gib * GIB), ("runtime", CPU_ENGINE_RUNTIME_GIB * GIB)]
        return _estimate("engine (CPU)", [], items + process)
    items = [("weights / TP", weights), ("KV cache", a.kv_cache_gib * GIB), ("runtime", ENGINE_RUNTIME_GIB * GIB)]
    return _estimate(f"engine worker (TP {a.tensor_parallel_size})", items, process)


def reward_estimate(cfg: Config, shape: ModelShape | None) -> Estimate:
    """A sequence classifier scoring reward.batch_size texts of up to max_model_len tokens, without grad."""
    process = _process(cfg.reward.num_gpus)
    if shape is None:
        return _estimate("reward model", [], process)
    b = DTYPE_BYTES.get(shape.dtype, 4)
    tokens = cfg.reward.batch_size * cfg.actors.max_model_len
    items = [
        ("weights", shape.params * b),
        ("batch activations", tokens * (4 * shape.hidden + 3 * shape.intermediate) * b),
    ]
    if cfg.reward.num_gpus == 0:
        return _estimate("reward model", [], items + process)
    loading = [("checkpoint read before moving to the GPU", shape.params * b)]
    return _estimate("reward model", items + [("CUDA runtime", CUDA_RUNTIME_GIB * GIB)], loading + process)


def merger_estimate(cfg: Config, shape: ModelShape) -> Estimate:
    """What the merger's process holds at its peak (measured: bench/merger_memory.py, tests/merger/test_memory.py).

    It streams θ_init and the M policies from their directories and writes θ_slerp and θ_init tensor by tensor,
    holding no model whole: two read-ahead sets of one tensor per input plus two output tensors, each as large as
    the largest tensor in fp32.
    """
    m = cfg.warp.runs
    items = [("read-ahead and output tensors", (2 * (m + 1) + 2) * shape.largest_tensor * 4)]
    return _estimate("merger", [], items + _process(0))


def _process(gpus: float) -> list[tuple[str, float]]:
    return [("process", (PROCESS_RAM_GIB + (CUDA_HOST_RAM_GIB if gpus > 0 else 0.0)) * GIB)]


def _estimate(actor: str, gpu: list[tuple[str, float]], host: list[tuple[str, float]]) -> Estimate:
    return Estimate(actor, tuple((k, v / GIB) for k, v in gpu), tuple((k, v / GIB) for k, v in host))


# ---------------------------------------------------------------------------------------------------
# The plan


def plan(cfg: Config, nodes: list[Node], model: ModelShape, reward_model: ModelShape | None = None) -> Plan:
    """Place every group, add up each node's estimated memory, and list what does not fit."""
    estimates = {
        "learner": learner_estimate(cfg, model),
        "engine": engine_estimate(cfg, model),
        "reward": reward_estimate(cfg, reward_model),
        "merger": merger_estimate(cfg, model),
    }
    shown = tuple(e for role, e in estimates.items() if role != "reward" or cfg.reward.remote)
    notes = _notes(cfg, reward_model)
    try:
        placement = assign(cfg, nodes)
    except PlacementError as exc:
        return Plan(cfg, model, (), shown, (), notes, (str(exc),))
    groups = group_specs(cfg, nodes)
    types = {n.name: n.node_type for n in nodes}
    rows = tuple(row for g in groups for row in _rows(g, placement[g.name], types))
    on_node: dict[str, list[tuple[str, dict[str, float], Estimate]]] = {n.name: [] for n in nodes}
    for g in groups:
        for i, (name, bundle) in enumerate(zip(placement[g.name], g.bundles, strict=True)):
            on_node[name].append((_bundle_label(g, i), bundle, estimates[g.role]))
    usage = tuple(_node_use(n, on_node[n.name]) for n in nodes)
    unknown = [u.node_type for u in usage if (u.gpu_gib and u.gpu_capacity_gib is None) or u.ram_capacity_gib is None]
    if unknown:
        notes += (f"memory of node types {', '.join(dict.fromkeys(unknown))} unknown: not checked there",)
    return Plan(cfg, model, rows, shown, usage, notes, tuple(_memory_failures(usage)))


def _bundle_label(group: GroupSpec, index: int) -> str:
    if group.role == "learner":
        return f"{group.name} rank {index}"
    return f"{group.name} TP {index}" if len(group.bundles) > 1 else group.name


def _rows(group: GroupSpec, names: list[str], types: dict[str, str]) -> list[Placed]:
    word = "rank" if group.role == "learner" else "TP worker"
    bundle = "{" + ", ".join(f"{k}: {v:g}" for k, v in group.bundles[0].items()) + "}"
    rows, start = [], 0
    for end in range(1, len(names) + 1):
        if end == len(names) or names[end] != names[start]:
            span = f"{start}" if end - start == 1 else f"{start}-{end - 1}"
            which = f"{word}{'s' if end - start > 1 else ''} {span}" if len(names) > 1 or word == "rank" else ""
            rows.append(Placed(group.name, which, names[start], types[names[start]], bundle, group.strategy))
            start = end
    return rows


def _node_use(node: Node, placed: list[tuple[str, dict[str, float], Estimate]]) -> NodeUse:
    """Whole-GPU bundles take free GPUs; fractional ones share the first GPU with room (as Ray assigns them)."""
    gpus = int(node.resources.get("GPU", 0))
    share, load, who = [0.0] * gpus, [0.0] * gpus, [[] for _ in range(gpus)]
    for label, bundle, estimate in placed:
        need = bundle.get("GPU", 0.0)
        if need <= 0:
            continue
        fits = [i for i in range(len(share)) if (share[i] == 0 if need >= 1 else share[i] + need <= 1 + 1e-9)]
        if not fits:  # assign() never over-subscribes; keep the sum honest if it ever does
            share.append(0.0)
            load.append(0.0)
            who.append([])
            fits = [len(share) - 1]
        first = fits[0]
        for i in fits[: math.ceil(need)] if need >= 1 else [first]:
            share[i] += min(1.0, need)
        load[first] += estimate.gpu_gib
        who[first].append(label)
    ram = sum(estimate.host_gib for _, _, estimate in placed)
    actors = tuple(", ".join(w) for w in who)
    return NodeUse(node.name, node.node_type, tuple(load), actors, node.gpu_memory_gib, ram, node.memory_gib)


def _memory_failures(usage: tuple[NodeUse, ...]) -> list[str]:
    """The fullest GPU and the fullest RAM of each node type, where over capacity."""
    failures = []
    for node_type in dict.fromkeys(u.node_type for u in usage):
        of_type = [u for u in usage if u.node_type == node_type]
        fullest = _fullest_gpu(of_type)
        if fullest is not None:
            node, gpu = fullest
            if node.gpu_capacity_gib and node.gpu_gib[gpu] > node.gpu_capacity_gib:
                failures.append(
                    f"{node_type} node {node.node}: GPU {gpu} ({node.gpu_actors[gpu]}) needs {node.gpu_gib[gpu]:.1f} "
                    f"GiB by this estimate, more than its {node.gpu_capacity_gib:.1f} GiB"
                )
        ram = max(of_type, key=lambda u: u.ram_gib)
        if ram.ram_capacity_gib and ram.ram_gib > ram.ram_capacity_gib:
            failures.append(
                f"{node_type} node {ram.node}: RAM needs {ram.ram_gib:.1f} GiB by this estimate, "
                f"more than its {ram.ram_capacity_gib:.1f} GiB"
            )
    return failures


def _fullest_gpu(usage: list[NodeUse]) -> tuple[NodeUse, int] | None:
    """(node, GPU index) of the largest per-GPU estimate among ``usage``; None when they have no GPUs."""
    gpus = [(u, i) for u in usage for i in range(len(u.gpu_gib))]
    return max(gpus, key=lambda ui: ui[0].gpu_gib[ui[1]], default=None)


def _notes(cfg: Config, reward_model: ModelShape | None) -> tuple[str, ...]:
    a, lr = cfg.actors, cfg.learners
    notes = [
        f"learner activations are the worst case: a micro-batch of {lr.micro_batch_size} sequences "
        f"(learners.micro_batch_size) of {a.max_model_len} tokens (actors.max_model_len), no recomputation",
        "EMA anchor: split over the learner's ranks under ZeRO-3, whole on every rank otherwise"
        + (", in node RAM (learners.anchor_on_cpu)" if lr.anchor_on_cpu else ""),
    ]
    if cfg.reward.kind == "hf" and not cfg.reward.remote:
        notes.append("the reward model runs in the driver process (reward.remote = false): not placed or estimated")
    elif cfg.reward.kind == "hf" and reward_model is None:
        notes.append(f"reward model {cfg.reward.path} is not on this machine: only its process memory is counted")
    notes.append("the driver is not a Ray actor: it runs where `ray job submit` starts it (the head)")
    return tuple(notes)


# ---------------------------------------------------------------------------------------------------
# The report


def format_plan(plan: Plan) -> str:
    cfg, model = plan.cfg, plan.model
    a, lr = cfg.actors, cfg.learners
    tp = a.tensor_parallel_size if a.num_gpus > 0 else 1
    reward = "a remote reward model, " if cfg.reward.remote else ""
    lines = [
        f"WARP plan: {_count(cfg.warp.runs, 'run')}, each a learner of {_count(lr.ranks, 'rank')} "
        f"(ZeRO-{lr.zero_stage}) and {_count(a.engines_per_run, 'engine')} of TP {tp}; {reward}a merger",
        f"model: {_params(model.params)} parameters in {cfg.model.dtype} ({model.source})",
        "",
        "Placement",
    ]
    if plan.rows:
        header = ("group", "bundles", "node", "type", "each bundle", "strategy")
        table = [header] + [(r.group, r.bundles, r.node, r.node_type, r.bundle, r.strategy) for r in plan.rows]
        lines += _table(table)
    else:
        lines.append("  (none: the groups do not fit, see below)")
    lines += ["", "Memory of one actor (estimates, GiB)"]
    for e in plan.estimates:
        for where, items, total in (("GPU", e.gpu, e.gpu_gib), ("RAM", e.host, e.host_gib)):
            if items:
                label = f"  {e.actor + ', ' + where:<28}{total:6.1f} = "
                lines += _wrap(label, [f"{name} {gib:.2f}" for name, gib in items])
    if plan.usage:
        lines += ["", "Memory per node type (the fullest node of each type, estimate / capacity)"]
        table = [("type", "nodes", "fullest GPU", "RAM")] + _per_type(plan.usage)
        lines += _table(table)
    lines += ["", "Notes"] + [f"  - {n}" for n in plan.notes]
    if plan.fits:
        lines += ["", "Fits: every group is placed and every estimate is within capacity."]
    else:
        lines += ["", "Does not fit"] + [f"  - {f}" for f in plan.failures]
    return "\n".join(lines)


def _per_type(usage: tuple[NodeUse, ...]) -> list[tuple[str, ...]]:
    rows = []
    for node_type in dict.fromkeys(u.node_type for u in usage):
        of_type = [u for u in usage if u.node_type == node_type]
        fullest = _fullest_gpu(of_type)
        gpu_text = "-"
        if fullest is not None:
            node, gpu = fullest
            gpu_text = f"{_vs(node.gpu_gib[gpu], node.gpu_capacity_gib)} ({node.node} GPU {gpu})"
        ram = max(of_type, key=lambda u: u.ram_gib)
        rows.append((node_type, str(len(of_type)), gpu_text, f"{_vs(ram.ram_gib, ram.ram_capacity_gib)} ({ram.node})"))
    return rows


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _wrap(label: str, parts: list[str], width: int = 116) -> list[str]:
    """``label`` then ``parts`` joined by commas, continued under the first part, never splitting one."""
    lines, line = [], label + parts[0]
    for part in parts[1:]:
        if len(line) + 2 + len(part) > width:
            lines.append(line + ",")
            line = " " * len(label) + part
        else:
            line += ", " + part
    return lines + [line]


def _vs(estimate: float, capacity: float | None) -> str:
    if capacity is None:
        return f"{estimate:.1f} GiB / unknown"
    return f"{estimate:.1f} / {capacity:.1f} GiB ({100 * estimate / capacity:.0f}%)"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
