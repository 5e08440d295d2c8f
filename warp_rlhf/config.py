"""Typed, single-sourced configuration for a WARP run.

Frozen dataclasses, one per section, validated in ``__post_init__`` with messages that name the key,
the value and the allowed range. YAML files only supply values; unknown keys are errors that list
the valid keys; ``section.key=value`` overrides come from the command line. Defaults are the paper's
values (Ramé et al. 2024, Gemma 7B) where the paper gives one.

Imports only the standard library and PyYAML: the CLI validates a config in well under a second.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: must be {allowed}")


class _Section:
    """Mixin giving each section its dotted name for error messages."""

    section: ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name


@dataclass(frozen=True)
class ModelConfig(_Section):
    section: ClassVar[str] = "model"

    path: str = "smollm2-135m"
    """θ_sft: a local Hugging Face directory, or the alias `smollm2-135m` (packaged, converted once)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Storage and compute dtype of policies, anchors, engines and checkpoints; auto: bfloat16 where the
    hardware computes it natively (CUDA since Ampere, CPUs with avx512_bf16 or amx_bf16), float32 otherwise."""

    def __post_init__(self) -> None:
        _require(bool(self.path), self._key("path"), self.path, "a model directory or `smollm2-135m`")
        dtypes = ("auto", "bfloat16", "float32")
        _require(self.dtype in dtypes, self._key("dtype"), self.dtype, "auto, bfloat16 or float32")


@dataclass(frozen=True)
class ActorsConfig(_Section):
    section: ClassVar[str] = "actors"

    engines_per_run: int = 1
    """K: vLLM engines in the actor pool that serves one run (with share_engines: that serves all runs)."""
    num_cpus: float = 1.0
    """CPUs reserved per engine (Ray resources)."""
    num_gpus: float = 0.0
    """GPUs reserved per engine; must equal tensor_parallel_size when > 0."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism inside one engine (GPU only)."""
    max_model_len: int = 512
    """Longest prompt + completion an engine accepts, in tokens."""
    kv_cache_gib: float = 1.0
    """KV-cache memory per engine in GiB (vLLM on CPU needs an explicit size)."""
    samples_per_prompt: int = 4
    """n: completions sampled per prompt (RLOO needs at least 2)."""
    temperature: float = 0.9
    """Sampling temperature (paper: 0.9)."""
    top_k: int = 50
    """Top-k sampling; -1 disables it (paper: not stated; ours: 50)."""
    max_new_tokens: int = 64
    """Maximum completion length in tokens; generation also stops at end of sequence."""
    weight_transport: Literal["object_store", "collective"] = "object_store"
    """How learner weights reach the engines after every step."""
    multiprocessing: bool = False
    """Run vLLM's engine core in its own process (production shape) instead of in the actor's process."""
    bucket_mb: float = 256.0
    """Bucket size in MiB of collective weight broadcasts: the most an engine worker buffers at once."""
    broadcast_timeout_s: float = 300.0
    """Collective weight broadcasts: how long a rank waits on another (forming the group, each bucket) before the
    broadcast fails and the weights go through the object store instead."""
    logprobs: Literal["raw", "processed"] = "raw"
    """Rollout logprobs: raw = log-softmax of the model's logits (π_θ at T=1); processed = after temperature/top-k."""
    drift_warn: float = 0.1
    """Warn when an engine's per-token log-probs differ from the learner's by more than this on average (nats)."""
    share_engines: bool = False
    """With learners.lora: one pool of K engines serves all M runs, one LoRA slot per run (only adapters move)."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.engines_per_run >= 1, k("engines_per_run"), self.engines_per_run, ">= 1")
        _require(self.num_cpus > 0, k("num_cpus"), self.num_cpus, "> 0")
        _require(self.num_gpus >= 0, k("num_gpus"), self.num_gpus, ">= 0")
        _require(self.tensor_parallel_size >= 1, k("tensor_parallel_size"), self.tensor_parallel_size, ">= 1")
        _require(
            self.num_gpus == 0 or self.num_gpus == self.tensor_parallel_size,
            k("num_gpus"),
            self.num_gpus,
            f"0 or equal to actors.tensor_parallel_size ({self.tensor_parallel_size})",
        )
        _require(self.max_model_len >= 16, k("max_model_len"), self.max_model_len, ">= 16")
        _require(self.kv_cache_gib > 0, k("kv_cache_gib"), self.kv_cache_gib, "> 0")
        _require(self.samples_per_prompt >= 1, k("samples_per_prompt"), self.samples_per_prompt, ">= 1")
        _require(self.temperature > 0, k("temperature"), self.temperature, "> 0")
        _require(self.top_k == -1 or self.top_k >= 1, k("top_k"), self.top_k, "-1 (off) or >= 1")
        _require(
            1 <= self.max_new_tokens < self.max_model_len,
            k("max_new_tokens"),
            self.max_new_tokens,
            f"in [1, actors.max_model_len = {self.max_model_len})",
        )
        _require(
            self.weight_transport in ("object_store", "collective"),
            k("weight_transport"),
            self.weight_transport,
            "object_store or collective",
        )
        _require(self.bucket_mb > 0, k("bucket_mb"), self.bucket_mb, "> 0")
        _require(self.broadcast_timeout_s > 0, k("broadcast_timeout_s"), self.broadcast_timeout_s, "> 0")
        _require(self.logprobs in ("raw", "processed"), k("logprobs"), self.logprobs, "raw or processed")
        _require(self.drift_warn > 0, k("drift_warn"), self.drift_warn, "> 0")


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig(_Section):
    section: ClassVar[str] = "learners.lora"

    rank: int = 0
    """r of every adapter; 0 trains the full model (no LoRA)."""
    alpha: float = 16.0
    """LoRA α: the adapter adds (α / r)·B·A to each target matrix."""
    target_modules: tuple[str, ...] = LLAMA_LINEAR
    """Names of the linear layers that get an adapter (default: every linear layer of a Llama block)."""
    dropout: float = 0.0
    """Must be 0: dropout would make the learner's log-probabilities differ from the sampler's."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.rank >= 0, k("rank"), self.rank, ">= 0 (0: full fine-tuning)")
        _require(self.alpha > 0, k("alpha"), self.alpha, "> 0")
        names = self.target_modules
        _require(bool(names) and all(n and "." not in n for n in names), k("target_modules"), list(names),
                 "a non-empty list of linear layer names, e.g. [q_proj, v_proj]")  # fmt: skip
        _require(self.dropout == 0.0, k("dropout"), self.dropout,
                 "0 (REINFORCE needs the log-probabilities of the sampled tokens; dropout changes them)")  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> tuple[str, ...]:
        """The target modules when LoRA is on, else none."""
        return self.target_modules if self.enabled else ()


@dataclass(frozen=True)
class LearnersConfig(_Section):
    section: ClassVar[str] = "learners"

    ranks: int = 1
    """R: DeepSpeed ranks (Ray actors) that form one learner."""
    num_cpus: float = 1.0
    """CPUs reserved per rank (Ray resources)."""
    num_gpus: float = 0.0
    """GPUs reserved per rank; 0 trains on CPU with gloo."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0 to 3 (3 for 7B-class models)."""
    lr: float = 1e-6
    """Adam learning rate (paper: 1e-6)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps (paper: 100)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam β1, β2."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    baseline: Literal["rloo", "mean", "none"] = "rloo"
    """REINFORCE baseline: leave-one-out mean per prompt (default), batch mean, or none."""
    share_prompts: Literal["auto", True, False] = "auto"
    """Compute each prompt once per micro-batch and reuse its key/value cache for all its samples (same log-probs).
    auto: on where the ranks compute on CPUs without ZeRO-3, off on GPUs and under ZeRO-3, where it measured
    slower (two passes: on a GPU twice the kernel launches, under ZeRO-3 twice the parameter gathers)."""
    anchor_on_cpu: bool = False
    """Keep the EMA anchor in CPU memory (large models on GPU; ZeRO 0-2: under ZeRO-3 the anchor is partitioned)."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's default); 0 partitions all."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train a LoRA adapter (peft) on the frozen θ_init instead of the full model: `learners.lora.rank` > 0."""

    @property
    def shares_prompts(self) -> bool:
        """``share_prompts`` resolved: auto shares on CPU ranks without ZeRO-3 only (README, Benchmarks)."""
        if self.share_prompts == "auto":
            return self.num_gpus == 0 and self.zero_stage != 3
        return bool(self.share_prompts)

    def __post_init__(self) -> None:
        k = self._key
        _require(self.ranks >= 1, k("ranks"), self.ranks, ">= 1")
        _require(self.num_cpus > 0, k("num_cpus"), self.num_cpus, "> 0")
        _require(self.num_gpus >= 0, k("num_gpus"), self.num_gpus, ">= 0")
        _require(self.zero_stage in (0, 1, 2, 3), k("zero_stage"), self.zero_stage, "0, 1, 2 or 3")
        _require(self.lr > 0, k("lr"), self.lr, "> 0")
        _require(self.warmup_steps >= 0, k("warmup_steps"), self.warmup_steps, ">= 0")
        _require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            k("adam_betas"),
            self.adam_betas,
            "two values in [0, 1)",
        )
        _require(self.weight_decay >= 0, k("weight_decay"), self.weight_decay, ">= 0")
        _require(self.grad_clip >= 0, k("grad_clip"), self.grad_clip, ">= 0 (0 disables)")
        _require(self.micro_batch_size >= 1, k("micro_batch_size"), self.micro_batch_size, ">= 1")
        _require(self.baseline in ("rloo", "mean", "none"), k("baseline"), self.baseline, "rloo, mean or none")
        _require(self.share_prompts == "auto" or isinstance(self.share_prompts, bool), k("share_prompts"),
                 self.share_prompts, "auto, true or false")  # fmt: skip
        _require(
            not (self.anchor_on_cpu and self.zero_stage == 3),
            k("anchor_on_cpu"),
            self.anchor_on_cpu,
            "false when learners.zero_stage = 3 (the ZeRO-3 anchor is partitioned like the policy, 1/R per rank)",
        )
        if self.lora.enabled:
            _require(self.zero_stage <= 2, k("zero_stage"), self.zero_stage,
                     "0, 1 or 2 with learners.lora (the adapter is tiny; ZeRO-3 partitions the base)")  # fmt: skip
            _require(not self.anchor_on_cpu, k("anchor_on_cpu"), self.anchor_on_cpu,
                     "false with learners.lora (the anchor is an adapter on the policy's own base)")  # fmt: skip
        _require(
            self.zero3_persistence_threshold >= 0,
            k("zero3_persistence_threshold"),
            self.zero3_persistence_threshold,
            ">= 0",
        )


@dataclass(frozen=True)
class RewardConfig(_Section):
    section: ClassVar[str] = "reward"

    kind: Literal["vader", "hf", "callable"] = "vader"
    """vader: lexicon sentiment in [-1, 1]; hf: a local sequence-classification model; callable: module:fn."""
    path: str = ""
    """The HF model directory (kind hf) or `module:function` (kind callable)."""
    length_penalty: float = 0.0
    """c in the paper's optional penalty r - c·len(y), len in completion tokens (paper: 0.0005)."""
    batch_size: int = 32
    """Texts per forward pass of a learned reward model."""
    remote: bool = False
    """Run the reward model in its own Ray actor instead of the driver process."""
    num_cpus: float = 1.0
    """CPUs reserved for a remote reward actor."""
    num_gpus: float = 0.0
    """GPUs reserved for a remote reward actor."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.kind in ("vader", "hf", "callable"), k("kind"), self.kind, "vader, hf or callable")
        if self.kind == "hf":
            _require(bool(self.path), k("path"), self.path, "a local model directory when reward.kind = hf")
        if self.kind == "callable":
            _require(":" in self.path, k("path"), self.path, "`module:function` when reward.kind = callable")
        _require(self.length_penalty >= 0, k("length_penalty"), self.length_penalty, ">= 0")
        _require(self.batch_size >= 1, k("batch_size"), self.batch_size, ">= 1")
        _require(self.num_cpus > 0, k("num_cpus"), self.num_cpus, "> 0")
        _require(self.num_gpus >= 0, k("num_gpus"), self.num_gpus, ">= 0")


@dataclass(frozen=True)
class MergerConfig(_Section):
    section: ClassVar[str] = "merger"

    method: Literal["slerp", "lerp"] = "slerp"
    """How the M runs' task vectors are combined."""
    granularity: Literal["tensor", "global"] = "tensor"
    """One SLERP angle per weight tensor (default) or one for the whole model."""
    shard_size_mb: int = 2048
    """Largest safetensors shard written, in MB; bigger models are sharded with an index file."""
    num_cpus: float = 1.0
    """CPUs reserved for the merger actor."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.method in ("slerp", "lerp"), k("method"), self.method, "slerp or lerp")
        _require(self.granularity in ("tensor", "global"), k("granularity"), self.granularity, "tensor or global")
        _require(self.shard_size_mb >= 1, k("shard_size_mb"), self.shard_size_mb, ">= 1")
        _require(self.num_cpus > 0, k("num_cpus"), self.num_cpus, "> 0")


@dataclass(frozen=True)
class WarpConfig(_Section):
    section: ClassVar[str] = "warp"

    iterations: int = 5
    """I: outer iterations (paper: 5)."""
    runs: int = 2
    """M: parallel RL runs per iteration, merged by SLERP (paper: 2)."""
    steps: tuple[int, ...] = (9000, 7000, 7000, 5000, 5000)
    """T: learner steps per run, one value for every iteration or one per iteration (paper: 9k,7k,7k,5k,5k)."""
    prompts_per_step: int = 128
    """Prompts drawn per learner step; each gets actors.samples_per_prompt completions (paper: 128)."""
    beta: float = 0.1
    """β: weight of the KL to the EMA anchor in the shaped reward (paper: 0.1)."""
    mu: float = 0.01
    """μ: EMA update rate of the anchor, θ_ema ← (1-μ)θ_ema + μθ (paper: 0.01)."""
    anchor: str = "ema"
    """The KL's anchor: `ema` (WARP: the policy's EMA, restarted at θ_init every iteration) or `sft` (classic
    RLHF: θ_sft, never updated; with warp.runs = 1 and warp.iterations = 1 this is KL-regularised RLOO)."""
    eta: float = 0.3
    """η: LITI rate, θ_init ← (1-η)θ_init + ηθ_slerp (paper: 0.3)."""
    lam: float = 0.5
    """λ: SLERP weight of the second run when M = 2 (paper: 0.5); M > 2 uses 1/k at step k."""
    checkpoint_every: int = 50
    """Save learner state for resume every this many steps (0: only at iteration ends)."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.iterations >= 1, k("iterations"), self.iterations, ">= 1")
        _require(self.runs >= 1, k("runs"), self.runs, ">= 1")
        _require(
            len(self.steps) in (1, self.iterations) and all(s >= 1 for s in self.steps),
            k("steps"),
            list(self.steps),
            f"one integer >= 1, or a list of {self.iterations} (warp.iterations) integers >= 1",
        )
        _require(self.prompts_per_step >= 1, k("prompts_per_step"), self.prompts_per_step, ">= 1")
        _require(self.beta >= 0, k("beta"), self.beta, ">= 0")
        _require(0 < self.mu <= 1, k("mu"), self.mu, "in (0, 1]")
        _require(self.anchor in ("ema", "sft"), k("anchor"), self.anchor, "ema or sft")
        _require(0 <= self.eta <= 1, k("eta"), self.eta, "in [0, 1]")
        _require(0 <= self.lam <= 1, k("lam"), self.lam, "in [0, 1]")
        _require(self.checkpoint_every >= 0, k("checkpoint_every"), self.checkpoint_every, ">= 0")

    def steps_in(self, iteration: int) -> int:
        """T for a 1-based iteration."""
        return self.steps[0] if len(self.steps) == 1 else self.steps[iteration - 1]


@dataclass(frozen=True)
class DataConfig(_Section):
    section: ClassVar[str] = "data"

    train: str = ""
    """Training prompts: a Parquet or JSONL file (empty: the packaged movie-review openings)."""
    eval: str = ""
    """Held-out evaluation prompts, never used in training (empty: the packaged held-out split)."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""

    def __post_init__(self) -> None:
        _require(bool(self.prompt_column), self._key("prompt_column"), self.prompt_column, "a column name")


@dataclass(frozen=True)
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"

    samples_per_prompt: int = 4
    """Monte-Carlo samples per held-out prompt for the reward and KL(π‖π_sft) estimates."""
    max_prompts: int = 0
    """Use at most this many held-out prompts (0: all)."""
    etas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """η' of the LITI family (1-η')θ_sft + η'θ_slerp on the Pareto front; η' > 1 extrapolates past θ_slerp (ExPO)."""
    temperature: float = 0.0
    """Sampling temperature of the evaluation, and of its KL (0: the run's actors.temperature, the trained setting)."""
    top_k: int = 0
    """Top-k of the evaluation sampler (0: the run's actors.top_k; -1: off); the KL is scored without truncation."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.samples_per_prompt >= 1, k("samples_per_prompt"), self.samples_per_prompt, ">= 1")
        _require(self.max_prompts >= 0, k("max_prompts"), self.max_prompts, ">= 0")
        _require(all(0 <= e <= 2 for e in self.etas), k("etas"), list(self.etas),
                 "values in [0, 2] (above 1: extrapolation past θ_slerp)")  # fmt: skip
        _require(self.temperature >= 0, k("temperature"), self.temperature,
                 "> 0, or 0 for the run's actors.temperature (greedy decoding has no KL to estimate)")  # fmt: skip
        _require(self.top_k >= -1, k("top_k"), self.top_k, "0 (the run's actors.top_k), -1 (off) or >= 1")


@dataclass(frozen=True)
class OutputConfig(_Section):
    section: ClassVar[str] = "output"

    dir: str = "runs/warp"
    """Where the run writes its checkpoints, metrics, samples and plots."""
    save_samples: bool = True
    """Append every rollout batch to Parquet logs under samples/."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.parquet."""
    policy_every: int = 0
    """Also save each run's policy every this many steps, as iter-<i>/snapshots/run-<m>-step-<t>/ (0: only
    the final one); `eval` then measures them too: the early-stopping front."""

    def __post_init__(self) -> None:
        _require(bool(self.dir), self._key("dir"), self.dir, "a directory path")
        _require(self.policy_every >= 0, self._key("policy_every"), self.policy_every, ">= 0 (0: only the final)")


@dataclass(frozen=True)
class ResourcesConfig(_Section):
    section: ClassVar[str] = "resources"

    address: str = ""
    """Ray cluster to join; empty: $RAY_ADDRESS if set, otherwise start a local cluster."""
    num_cpus: int = 0
    """CPUs of a local cluster started by the driver (0: all of this machine's)."""
    learner_resource: str = ""
    """Custom Ray resource marking the nodes that may host learner ranks (e.g. `learner_node`); empty: any node."""
    rollout_resource: str = ""
    """Custom Ray resource marking the nodes that may host engines and a remote reward model; empty: any node."""
    placement_timeout_s: float = 600.0
    """How long the driver waits for Ray to reserve the run's placement groups before giving up."""

    def __post_init__(self) -> None:
        k = self._key
        _require(self.num_cpus >= 0, k("num_cpus"), self.num_cpus, ">= 0")
        for name in ("learner_resource", "rollout_resource"):
            value = getattr(self, name)
            _require(value not in ("CPU", "GPU", "memory", "object_store_memory"), k(name), value,
                     "a custom resource name, not one of Ray's built-in resources")  # fmt: skip
        _require(self.placement_timeout_s > 0, k("placement_timeout_s"), self.placement_timeout_s, "> 0")


@dataclass(frozen=True)
class Config:
    """The whole run. Sections are built from YAML by :func:`load_config`."""

    seed: int = 0
    """Base seed; run m of iteration i derives its own seeds from it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    learners: LearnersConfig = field(default_factory=LearnersConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    merger: MergerConfig = field(default_factory=MergerConfig)
    warp: WarpConfig = field(default_factory=WarpConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        if self.learners.baseline == "rloo":
            _require(
                self.actors.samples_per_prompt >= 2,
                "actors.samples_per_prompt",
                self.actors.samples_per_prompt,
                ">= 2 when learners.baseline = rloo (leave-one-out needs two samples per prompt)",
            )
        if self.actors.share_engines:
            _require(self.learners.lora.enabled, "actors.share_engines", True,
                     "false unless learners.lora.rank > 0 (runs can share engines only when they differ by an "
                     "adapter)")  # fmt: skip
        if self.learners.lora.enabled and self.warp.anchor == "sft":
            _require(self.warp.iterations == 1, "warp.iterations", self.warp.iterations,
                     "1 with learners.lora and warp.anchor = sft (the adapter's base is θ_init, which is θ_sft "
                     "only in the first iteration)")  # fmt: skip
        if self.warp.runs > 2:
            _require(self.warp.lam == 0.5, "warp.lam", self.warp.lam, "0.5 when warp.runs > 2 (λ = 1/k is used)")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings (YAML) with key and type checking.


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint, converting YAML's int→float and list→tuple."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(hint)):  # 1 is not True here
            choices = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(hint))
            raise ConfigError(f"{key} = {value!r}: must be one of {choices}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        items = value if isinstance(value, list | tuple) else [value]
        elem = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, elem, key) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key} = {value!r}: must be a list of {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")  # not used by any field
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: must be an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be a string")
        return str(value)
    raise TypeError(f"unsupported type {hint!r} for {key}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        bad = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key {bad!r} in {where}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``learners.lr=2e-6`` → ("learners.lr", 2e-06); values are parsed as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key, value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_from_dict(values: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = _to_plain(values or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or nothing, for all defaults), apply overrides, validate everything."""
    values: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    return config_from_dict(values, overrides)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
